"""Each script stands alone, so helpers are copied between scripts (by design). A copy edited alone would drift from
the others silently, and a test of one copy would no longer vouch for the rest: every function defined under the same
name in several scripts must be the same source in all of them, except those listed in DIFFERENT, which differ on
purpose (a script-specific message, dataset or run-name pattern)."""

import ast
import os
import shutil

from conftest import ROOT, run_script

SCRIPTS = [
    "sft.py",
    "reward_model.py",
    "dpo_baseline.py",
    "ppo_baseline.py",
    "drpo_tldr.py",
    "drpo_hh.py",
    "eval_winrate.py",
    "tiny_world.py",
    "rebel.py",
    "online_dpo.py",
    "hypo.py",
]
DIFFERENT = {
    "build_episodes": "TL;DR posts and comparisons, against HH transcripts (REBEL reads both)",
    "load_models": "PPO and DR-PO load a value model, REBEL none",
    "evaluate": "SFT's eval loss, the reward model's accuracy, the RL scripts' greedy score (REBEL's models: no value)",
    "generate_responses": "DR-PO's response begins with the reset prefix (its state's last h tokens), PPO's after the prompt",
    "print_samples": "DR-PO's table shows reset episodes' prefix in [brackets], REBEL's pairs, SFT's its references",
    "train": "each script's own training loop",
    "main": "each script's own set-up",
}
# one script's copy differs on purpose; the other scripts' copies must still agree
ONE_DIFFERS = {"check_flags": ("online_dpo.py", "its rollout splits prompts into chunks, the other scripts' episodes")}


def copies(root=ROOT):
    """{function name: {script: source}} for the functions defined in more than one script."""
    found = {}
    for script in SCRIPTS:
        source = open(os.path.join(root, script)).read()
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef):
                found.setdefault(node.name, {})[script] = ast.get_source_segment(source, node)
    return {name: by_script for name, by_script in found.items() if len(by_script) > 1}


def test_every_copied_helper_is_the_same_in_every_script():
    shared = copies()
    drifted = [
        f"{name}: {len(set(by.values()))} versions in {sorted(by)}"
        for name, by in shared.items()
        if name not in DIFFERENT
        and len({source for script, source in by.items() if script != ONE_DIFFERS.get(name, ("",))[0]}) > 1
    ]
    assert not drifted, drifted
    # what the check covers, so that a rename cannot empty it: the PPO, data, distributed and run helpers
    for name, holders in {
        "compute_gae": 3,
        "whiten": 3,
        "ppo_losses": 3,
        "truncate_response": 3,
        "per_token_rewards": 3,
        "reset_states": 3,
        "tldr_query": 5,
        "hh_split": 5,
        "load_rows": 6,
        "comparison_texts": 3,
        "from_pretrained": 6,
        "init_distributed": 6,
        "on_rank0": 6,
        "average_gradients": 6,
        "sync_gradients": 6,
        "place": 6,
        "gathered": 4,
        "save_checkpoint": 6,
        "restore": 6,
        "resume": 6,
        "start_run": 6,
        "check_flags": 6,
        "check_hub": 6,
        "save_model": 6,
        "score_responses": 3,
        "log_metrics": 6,
        "left_pad": 4,
    }.items():
        assert len(shared[name]) >= holders, (name, sorted(shared[name]))
    assert len(shared) >= 55


def test_an_edited_copy_is_caught(tmp_path):
    """The check fails when one copy of a helper is edited alone (here whiten, in drpo_hh.py only)."""
    for script in SCRIPTS:
        text = open(os.path.join(ROOT, script)).read()
        if script == "drpo_hh.py":
            text = text.replace(
                "def whiten(values, mask, shift_mean: bool = True):", "def whiten(values, mask, shift_mean: bool = False):"
            )
        (tmp_path / script).write_text(text)
    versions = copies(tmp_path)["whiten"]
    assert len(set(versions.values())) == 2 and sorted(versions) == ["drpo_hh.py", "drpo_tldr.py", "ppo_baseline.py"]


def sibling_imports(source: str):
    """The top-level scripts a script imports, at any depth (a function's import too), by module name."""
    stems = {script[:-3] for script in SCRIPTS} | {"plot_runs"}
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return sorted(names & stems)


def test_every_script_runs_copied_alone_into_an_empty_folder(tmp_path):
    """STYLE.md: each file stands alone. The copy, alone in a folder of its own, answers --help (the copy runs, by its
    absolute path: its folder is the first entry of sys.path, as for `python script.py`), writes nothing there, and no
    script imports another top-level script anywhere, a function's import included (which --help would not reach)."""
    for script in SCRIPTS:
        folder = tmp_path / script[:-3]
        folder.mkdir()
        shutil.copy(os.path.join(ROOT, script), folder)
        proc = run_script(folder / script, "--help", cwd=folder)
        assert proc.stdout.startswith("usage:") and "--seed" in proc.stdout, (script, proc.stdout[:300])
        assert os.listdir(folder) == [script] and sibling_imports(open(folder / script).read()) == [], script


def test_a_script_that_imports_a_sibling_is_caught(tmp_path):
    """The test above can fail: a copy that imports sft.py (at the top, or inside a function) is refused both ways."""
    text = open(os.path.join(ROOT, "drpo_tldr.py")).read()
    (tmp_path / "drpo_tldr.py").write_text(text.replace("import contextlib\n", "import contextlib\nimport sft\n", 1))
    proc = run_script(tmp_path / "drpo_tldr.py", "--help", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "No module named 'sft'" in proc.stdout
    inside = text.replace(
        "    args = tyro.cli(Args)\n", "    from sft import encode  # noqa: F401\n    args = tyro.cli(Args)\n", 1
    )
    assert inside != text and sibling_imports(inside) == ["sft"] and sibling_imports(text) == []
