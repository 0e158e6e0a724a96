"""The README's figures on reading drpo_tldr.py are the file's own: its length, the lines where DR-PO's pieces, PPO's,
the training loop and the appendix begin, and how many lines `diff ppo_baseline.py drpo_tldr.py` changes."""

import os
import re
import subprocess

from conftest import ROOT


def figure(text: str, pattern: str) -> int:
    match = re.search(pattern, text)
    assert match, f"the README no longer states {pattern!r}"
    return int(match.group(1).replace(",", ""))


def test_the_readmes_reading_figures_are_the_scripts():
    readme = open(os.path.join(ROOT, "README.md")).read()
    start = readme.index("**Reading `drpo_tldr.py`**")
    paragraph = " ".join(readme[start : readme.index("\n\n", start)].split())
    lines = open(os.path.join(ROOT, "drpo_tldr.py")).read().splitlines()
    first = {  # the first line (1-based) that starts with each marker
        marker: next(i for i, line in enumerate(lines, 1) if line.startswith(marker))
        for marker in ("# ---- DR-PO:", "# ---- PPO for language models", "# ---- the training loop", "# Appendix")
    }
    assert figure(paragraph, r"\(([\d,]+) lines, formatted by ruff") == len(lines)
    assert figure(paragraph, r"DR-PO's own pieces from line (\d+)") == first["# ---- DR-PO:"]
    assert figure(paragraph, r"PPO for language models \(line (\d+)") == first["# ---- PPO for language models"]
    assert figure(paragraph, r"the training loop from line (\d+)") == first["# ---- the training loop"]
    assert figure(paragraph, r"Everything after line (\d+) is a marked appendix") == first["# Appendix"] - 1
    diff = subprocess.run(["diff", "ppo_baseline.py", "drpo_tldr.py"], cwd=ROOT, capture_output=True, text=True).stdout
    changed = sum(line[:2] in ("< ", "> ") or line in ("<", ">") for line in diff.splitlines())
    assert figure(paragraph, r"drpo_tldr.py` has ([\d,]+) changed lines") == changed


TRAINING_SCRIPTS = ["sft.py", "reward_model.py", "dpo_baseline.py", "ppo_baseline.py", "drpo_tldr.py", "drpo_hh.py",
                    "rebel.py", "online_dpo.py", "hypo.py"]  # fmt: skip


def test_every_script_follows_the_layout_of_style_md():
    """../shared/STYLE.md's layout, in every script: a header comment, `Args` with a one-line comment on each flag (no
    docstring under a field; the computed, suppressed fields aside), the method before `main()`, then one marked
    appendix, then `main()` called last."""
    for script in TRAINING_SCRIPTS + ["eval_winrate.py"]:
        source = open(os.path.join(ROOT, script)).read()
        lines = source.splitlines()
        assert lines[0].startswith("# "), script
        args = source[source.index("class Args:") : source.index("\n\n\n", source.index("class Args:"))]
        fields = [line for line in args.splitlines()[1:] if re.match(r"    \w+: ", line) and "Suppress[" not in line]
        assert fields and all("  # " in line for line in fields), (script, [f for f in fields if "  # " not in f])
        assert '"""' not in args, f"{script}: a flag documented by a docstring, not a one-line comment"
        main, appendix = lines.index("def main():"), next(i for i, line in enumerate(lines) if line.startswith("# Appendix"))
        assert main < appendix and lines[-2:] == ['if __name__ == "__main__":', "    main()"], script
