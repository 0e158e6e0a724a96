"""Data loading shared by sft.py and reward_model.py (each script carries its own copy; both copies are checked)."""

import ast
import json

import pytest
import torch
from conftest import SHARED, requires_shared, run_script

import dpo_baseline
import drpo_hh
import drpo_tldr
import eval_winrate
import hypo
import ppo_baseline
import reward_model
import sft

SCRIPTS = [sft, reward_model]
ROW = {"subreddit": "pets", "title": "help with my cat", "post": "line one .\nline two .\nline three ."}


def fmt(post):
    return f"SUBREDDIT: r/pets\n\nTITLE: help with my cat\n\nPOST: {post}\n\nTL;DR:"


@pytest.mark.parametrize("script", SCRIPTS)
def test_tldr_query_format_and_smart_truncation(script, tokenizer):
    full = tokenizer.encode(fmt(ROW["post"]))
    ids, truncated = script.tldr_query(tokenizer, ROW, query_length=512)
    assert ids == full and not truncated
    # one token too few: the last line goes, the rest stays whole (OpenAI's smart truncation)
    ids, truncated = script.tldr_query(tokenizer, ROW, query_length=len(full) - 1)
    assert tokenizer.decode(ids) == fmt("line one .\nline two .") and truncated
    # a post with no newline left is hard-truncated, keeping the "TL;DR:" tail and filling the budget
    row = dict(ROW, post="word " * 40)
    budget = len(tokenizer.encode(fmt(""))) + 10
    ids, truncated = script.tldr_query(tokenizer, row, query_length=budget)
    text = tokenizer.decode(ids)
    assert truncated and len(ids) <= budget and text.endswith("\n\nTL;DR:") and text.startswith(fmt("word word")[:40])
    assert len(ids) >= budget - 2
    # even an empty post does not fit: None (the caller drops and counts the row)
    assert script.tldr_query(tokenizer, ROW, query_length=5) is None


@pytest.mark.parametrize("script", SCRIPTS)
def test_hh_split(script):
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: cat?\n\nAssistant: a cat is a pet."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: cat?\n\nAssistant: no idea"
    prompt, c, r = script.hh_split(chosen, rejected)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: cat?\n\nAssistant:"
    assert (c, r) == (" a cat is a pet.", " no idea")
    # responses that share a first word must not eat into the prompt: the split is at a shared "Assistant:"
    p2, c2, r2 = script.hh_split(chosen + " yes", chosen + " no")
    assert p2 == prompt and c2 == " a cat is a pet. yes"
    assert script.hh_split("\n\nHuman: a", "\n\nHuman: b") is None


@pytest.mark.parametrize("script", SCRIPTS)
def test_response_gets_space_and_eos_and_pad_is_not_eos(script, world):
    tokenizer = script.load_tokenizer(str(world / "base"))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = script.response_ids(tokenizer, "cat dog .")
    assert ids == tokenizer.encode(" cat dog .") + [tokenizer.eos_token_id]
    assert script.response_ids(tokenizer, " cat dog .") == ids  # one leading space, never two


SPECIAL_TEXT = "my cat <|endoftext|> ate <|padding|> the [PAD] food"  # a Reddit post can hold a special token's string


@pytest.mark.parametrize("script", [sft, reward_model, dpo_baseline, ppo_baseline, drpo_tldr, drpo_hh, eval_winrate])
def test_special_token_strings_in_data_are_plain_text(script, tokenizer):
    """Never the EOS or the pad token: an EOS inside a post or a reset prefix would end it, a pad would be masked out."""
    specials = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    if hasattr(script, "response_ids"):  # the EOS is the last id, and only there
        ids = script.response_ids(tokenizer, SPECIAL_TEXT)
        assert (
            ids[-1] == tokenizer.eos_token_id
            and not specials & set(ids[:-1])
            and tokenizer.decode(ids[:-1]) == " " + SPECIAL_TEXT
        )
    if hasattr(script, "tldr_query"):
        for budget in (512, 60):  # whole, and hard-truncated (the post has no newline)
            ids, _ = script.tldr_query(tokenizer, dict(ROW, post=SPECIAL_TEXT * 3), budget)
            assert not specials & set(ids) and "<|endoftext|>" in tokenizer.decode(ids) and len(ids) <= budget
    if hasattr(script, "hh_prompt"):
        ids, _ = script.hh_prompt(tokenizer, f"\n\nHuman: {SPECIAL_TEXT}\n\nAssistant:", 512)
        assert not specials & set(ids) and tokenizer.decode(ids) == f"\n\nHuman: {SPECIAL_TEXT}\n\nAssistant:"
    ids = script.encode(tokenizer, SPECIAL_TEXT)
    assert not specials & set(ids) and tokenizer.decode(ids) == SPECIAL_TEXT


def test_tokenizer_without_pad_gets_a_dedicated_one(world, tmp_path):
    tokenizer = sft.load_tokenizer(str(world / "base"))
    tokenizer.pad_token = tokenizer.eos_token  # the common pad = EOS setting
    tokenizer.save_pretrained(tmp_path)
    fixed = sft.load_tokenizer(str(tmp_path))
    assert fixed.pad_token == "[PAD]" and fixed.pad_token_id == len(fixed) - 1 and fixed.pad_token_id != fixed.eos_token_id


def test_sft_collate_masks_query_and_padding(tokenizer):
    pad = tokenizer.pad_token_id
    input_ids, attention_mask, labels = sft.collate([([5, 6, 7], [8, 0]), ([5], [9, 10, 0])], pad, "cpu")
    assert input_ids.tolist() == [[5, 6, 7, 8, 0], [pad, 5, 9, 10, 0]]  # left-padded: every response ends the row
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert labels.tolist() == [[-100, -100, -100, 8, 0], [-100, -100, 9, 10, 0]]  # EOS (0) is learnt, pad is not
    # --prompt-loss (N+'s SFT): the prompt's tokens are learnt too, all but the first (nothing of the row precedes it)
    _, _, labels = sft.collate([([5, 6, 7], [8, 0]), ([5], [9, 10, 0])], pad, "cpu", prompt_loss=True)
    assert labels.tolist() == [[-100, 6, 7, 8, 0], [-100, -100, 9, 10, 0]]


def write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_missing_column_names_column_file_and_schema(tmp_path, world):
    path = write(tmp_path / "bad.jsonl", [{"subreddit": "a", "title": "b", "post": "c"}])
    proc = run_script("sft.py", "--base-model", world / "base", "--dataset-name", path, check=False)
    assert proc.returncode != 0
    assert f"{path} (split train) lacks column(s) ['summary']" in proc.stdout and "expected the schema" in proc.stdout


def test_non_string_field_names_row_and_column(tmp_path, tokenizer):
    path = write(
        tmp_path / "bad.jsonl",
        [
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            {"chosen": 3, "rejected": "x"},
        ],
    )
    args = reward_model.Args(task="hh", dataset_name=path, response_length=16)
    with pytest.raises(SystemExit, match=r"row 1, column 'chosen': expected str, got int"):
        reward_model.build_pairs(args, tokenizer, "train", None)


def test_empty_and_identical_pairs_are_skipped_and_counted(tmp_path, tokenizer, capsys):
    prompt = "\n\nHuman: my cat ?\n\nAssistant:"
    rows = [
        {"chosen": prompt + " cat vet .", "rejected": prompt + " pizza ."},
        {"chosen": prompt + " ", "rejected": prompt + " pizza ."},  # empty chosen
        {"chosen": prompt + " cat .", "rejected": prompt + " cat ."},  # identical
        {"chosen": "no turns at all", "rejected": "nothing shared"},
    ]  # no prompt
    args = reward_model.Args(task="hh", dataset_name=write(tmp_path / "hh.jsonl", rows), response_length=16, query_length=4)
    pairs = reward_model.build_pairs(args, tokenizer, "train", None)
    out = capsys.readouterr().out
    assert len(pairs) == 1
    for key in (
        "'dropped_empty_response': 1",
        "'dropped_identical_pair': 1",
        "'dropped_no_shared_prompt': 1",
        "'query_truncated': 3",
    ):
        assert key in out
    query, chosen, rejected = pairs[0]
    assert query == tokenizer.encode(prompt)[-4:]  # HH keeps the end of a long prompt
    assert chosen[-1] == rejected[-1] == tokenizer.eos_token_id


def test_single_file_split_slicing_and_bad_split(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"chosen": str(i), "rejected": "x"} for i in range(10)])
    schema = {"chosen": str, "rejected": str}
    assert [r["chosen"] for r in sft.load_rows(path, "train[80%:]", schema)] == ["8", "9"]
    with pytest.raises(SystemExit, match="could not read split 'validation'"):
        sft.load_rows(path, "validation", schema)


def test_unreachable_hub_gives_a_one_paragraph_hint(world):
    proc = run_script(
        "sft.py",
        "--base-model",
        world / "base",
        "--dataset-name",
        "nobody/not-a-dataset",
        check=False,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode != 0 and "Could not load the dataset 'nobody/not-a-dataset'" in proc.stdout
    assert "point --dataset-name at a folder or json/jsonl file" in proc.stdout and "Traceback" not in proc.stdout
    proc = run_script("reward_model.py", "--sft-model-path", "nobody/not-a-model", check=False, env={"HF_HUB_OFFLINE": "1"})
    assert "Could not load 'nobody/not-a-model'" in proc.stdout and "point the model flags (--sft-model-path" in proc.stdout


def nplus_process_query(tokenizer, info, length):
    """summarize_from_feedback_details/tldr_dataset.py, process_query (TL;DR parameters), transcribed line by line.
    Special-token strings are encoded as text: the Pythia tokenizer.json in ../shared marks `assistant` and `RWKV` as
    special tokens, which the tokenizer the public checkpoints were trained with did not."""
    info = dict(info)
    query_tokens = tokenizer.encode(FMT_NPLUS.format(**info), split_special_tokens=True)
    while len(query_tokens) > length:
        if not len(info["post"]):
            raise ValueError("Could not truncate enough!")
        i = -1  # default to just remove one character
        try:
            i = info["post"].rindex("\n")
        except ValueError:
            pass
        info["post"] = info["post"][:i]
        query_tokens = tokenizer.encode(FMT_NPLUS.format(**info), split_special_tokens=True)
    return query_tokens


FMT_NPLUS = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def hub_comparison(chosen, rejected, choice=0, post="my cat is old .\nhelp", article=None, batch="batch3"):
    """A row of openai/summarize_from_feedback (config comparisons) with every column of the Hub schema. A CNN/DailyMail
    row (batches batch0_cnndm, cnndm0, cnndm2 of the validation split) has an article and its title, no post or subreddit
    (as OpenAI's dataset README shows one: `"post": null, "title": "Newcastle United midfielder ...", "subreddit": null`)."""
    info = {"id": "t3_abc", "post": post, "title": "my cat", "subreddit": "pets", "site": None, "article": None}
    if article is not None:
        info |= {"id": "dm-1", "post": None, "title": "A headline", "subreddit": None, "site": "dailymail", "article": article}
    texts = [chosen, rejected] if choice == 0 else [rejected, chosen]
    return {
        "info": info,
        "summaries": [{"text": x, "policy": "sup2", "note": None} for x in texts],
        "choice": choice,
        "worker": "w7",
        "batch": batch,
        "split": "valid1",
        "extra": {"confidence": 8},
    }


@pytest.mark.parametrize("script", [reward_model, dpo_baseline, drpo_tldr])
def test_cnndm_rows_of_the_hub_comparisons_are_skipped_and_counted(script, tokenizer, tmp_path, capsys):
    rows = [
        hub_comparison(" cat vet .", " pizza ."),
        hub_comparison(" a story .", " another .", article="(CNN) a story", batch="cnndm0"),
        hub_comparison(" vet .", " soup .", choice=1),
        hub_comparison(" x .", " y .", article="(CNN) more", batch="batch0_cnndm"),
    ]

    def build(path):
        if script is drpo_tldr:
            return drpo_tldr.build_episodes(
                drpo_tldr.Args(dataset_name=path, reset_source="chosen", response_length=16), tokenizer
            )[0]
        return script.build_pairs(script.Args(task="tldr", dataset_name=path, response_length=16), tokenizer, "train", None)

    kept = build(write(tmp_path / "valid.jsonl", rows))
    assert len(kept) == 2 and "'dropped_cnndm': 2" in capsys.readouterr().out
    # a TL;DR row with a null post (no article) is not a CNN/DailyMail row: it still stops with the row and the column
    rows.append(hub_comparison(" a .", " b .", post=None))
    with pytest.raises(SystemExit, match=r"row 4, column 'info.post': expected str, got NoneType"):
        build(write(tmp_path / "bad.jsonl", rows))


@pytest.mark.parametrize("script", [drpo_tldr, drpo_hh])
def test_chosen_responses_longer_than_an_episode_are_never_reset(script, tokenizer, tmp_path, capsys):
    """From a chosen response longer than the episode the policy would have a few tokens to end a response that runs
    on (the missing-EOS penalty, almost always): its prompt is rolled out, never reset from."""
    long = " " + " ".join(["cat", "vet", "dog"] * 6) + " ."  # far more than 8 tokens
    if script is drpo_tldr:
        path = write(tmp_path / "c.jsonl", [hub_comparison(" cat vet .", " no ."), hub_comparison(long, " no .")])
        args = drpo_tldr.Args(dataset_name=path, reset_source="chosen", response_length=8)
    else:
        prompt = "\n\nHuman: my cat ?\n\nAssistant:"
        path = write(
            tmp_path / "h.jsonl",
            [
                {"chosen": prompt + " cat vet .", "rejected": prompt + " no ."},
                {"chosen": prompt + long, "rejected": prompt + " no ."},
            ],
        )
        args = drpo_hh.Args(dataset_name=path, response_length=8)
    queries, reset_responses = script.build_episodes(args, tokenizer)
    assert len(queries) == 2 and reset_responses[0] == script.response_ids(tokenizer, "cat vet .") and reset_responses[1] == []
    assert "'long_response_never_reset': 1" in capsys.readouterr().out
    _, h, reset = script.reset_states(queries, reset_responses, 1.0, 1, 8, torch.Generator().manual_seed(0))
    assert reset.tolist() == [True, False] and h[1] == 0


@pytest.fixture(scope="module")
def nplus_queries():
    """Real TL;DR posts with their N+ queries at 512 tokens (all 945) and 256 tokens (the first 100)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(f"{SHARED}/tokenizers/pythia")
    rows = [json.loads(x) for x in open(f"{SHARED}/data/tldr/sft_posts_dev.jsonl")]
    cases = [
        (row, length, nplus_process_query(tokenizer, row, length))
        for length, subset in ((512, rows), (256, rows[:100]))
        for row in subset
    ]
    return tokenizer, cases


@requires_shared
@pytest.mark.parametrize("script", [sft, reward_model, dpo_baseline, ppo_baseline, drpo_tldr])
def test_tldr_truncation_is_the_n_plus_rule_token_for_token_on_real_posts(script, nplus_queries):
    """The public TL;DR SFT and reward checkpoints were trained on queries cut by the N+ code; ours must be the same
    tokens (before: 5 of 945 real posts differed at 512 tokens, 701 at 256, from stripping after each cut)."""
    tokenizer, cases = nplus_queries
    truncated = {512: 0, 256: 0}
    for row, length, expected in cases:
        ids, was_truncated = script.tldr_query(tokenizer, row, length)
        assert ids == expected, (length, row["id"])
        truncated[length] += was_truncated
    assert truncated == {512: 6, 256: 84}  # the rule is exercised: 6 real posts are too long at 512


def test_eval_winrate_cuts_tldr_posts_as_training_does(tokenizer, tmp_path):
    row = {
        "id": "x",
        "subreddit": "pets",
        "title": "my cat",
        "post": "line one .  \n\nline two .\nthree words here",
        "summary": "s",
    }
    write(tmp_path / "d.jsonl", [row])
    empty = len(sft.tldr_query(tokenizer, dict(row, post=""), 512)[0])
    for length in (empty + 1, empty + 4, empty + 9, empty + 14, 512):  # cut character by character, at newlines, not at all
        expected, _ = sft.tldr_query(tokenizer, row, length)
        args = eval_winrate.Args(dataset_name=str(tmp_path / "d.jsonl"), split="train", query_length=length, num_examples=1)
        ((prompt, _),) = eval_winrate.load_examples(args, tokenizer)
        assert eval_winrate.encode(tokenizer, prompt) == expected


@requires_shared
def test_real_data_loads_unchanged(capsys, tmp_path):
    """The Hub-schema slices in ../shared/data go through the same code path (Pythia tokenizer)."""
    from transformers import AutoTokenizer

    with pytest.raises(SystemExit, match="has no EOS token"):  # tokenizer.json alone sets no EOS: a clear error
        sft.load_tokenizer(f"{SHARED}/tokenizers/pythia")
    pythia = AutoTokenizer.from_pretrained(f"{SHARED}/tokenizers/pythia")
    pythia.eos_token = "<|endoftext|>"
    pythia.save_pretrained(tmp_path)
    tokenizer = sft.load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    args = reward_model.Args(task="tldr", dataset_name=f"{SHARED}/data/tldr/comparisons_gpt4_dev.jsonl", response_length=53)
    pairs = reward_model.build_pairs(args, tokenizer, "train", None)
    out = capsys.readouterr().out
    assert "extra column(s) ['labeler', 'gpt4_explanation']" in out
    # every row is a Reddit comparison of two short summaries: all 600 are kept, none dropped
    assert kept_and_dropped(out) == (len(pairs), 600, 0) and all(len(q) <= 512 and c[-1] == 0 for q, c, _ in pairs)
    args = sft.Args(task="hh", dataset_name=f"{SHARED}/data/hh/harmless_base_test_dev.jsonl", response_length=128)
    examples = sft.build_examples(args, tokenizer, "train", None)
    kept, rows, dropped = kept_and_dropped(capsys.readouterr().out)  # every row kept or counted: no data is lost
    assert (kept, rows) == (len(examples), 1600) and kept + dropped == rows and 0 < dropped < 100
    assert all(tokenizer.decode(q).endswith("\n\nAssistant:") or len(q) == 512 for q, _ in examples)


def kept_and_dropped(out: str):
    """(kept, rows, dropped) from a build function's count line: `... N pairs kept; {'rows': R, 'dropped_x': D, ...}`."""
    line = next(x for x in out.splitlines() if " kept; {" in x)
    counts = ast.literal_eval(line.split(" kept; ", 1)[1])
    kept = int(line.split(" kept; ", 1)[0].split(": ")[-1].split()[0])
    return kept, counts["rows"], sum(v for k, v in counts.items() if k.startswith("dropped_"))


def hh_subsets(tmp_path, n=6):
    """An HH split as Anthropic/hh-rlhf joins it: one subset's rows after another's (harmless-base first)."""
    rows = [
        {"chosen": f"\n\nHuman: {kind} {i}\n\nAssistant: answer {i}", "rejected": f"\n\nHuman: {kind} {i}\n\nAssistant: no"}
        for kind in ("harmless", "helpful")
        for i in range(n)
    ]
    rows[6]["chosen"] = "\n\nHuman: helpful 0\n\nAssistant: "  # an empty chosen response (4 of the 1,600 real rows)
    return write(tmp_path / "hh.jsonl", rows)


def test_eval_examples_are_spread_over_the_split_and_empty_references_skipped(tmp_path, capsys):
    """The first 512 rows of Anthropic/hh-rlhf's test split are harmless-base's red-team prompts alone (2,312 come
    before the first helpful one): the eval examples are evenly spaced over the split instead. A row whose chosen
    response is empty would be a free win for any policy: it is skipped, and counted with the rows of no shared turn."""
    args = eval_winrate.Args(task="hh", dataset_name=str(hh_subsets(tmp_path)), split="train", num_examples=4)
    examples = eval_winrate.load_examples(args, None)  # rows 0, 3, 6 (empty: skipped) and 9 of the 12
    assert [p.split("Human: ")[1].split("\n")[0] for p, _ in examples] == ["harmless 0", "harmless 3", "helpful 3"]
    assert [r for _, r in examples] == [" answer 0", " answer 3", " answer 3"]
    assert "4 of 12 rows taken, evenly spaced; 1 skipped (HH: no shared Assistant turn, or an empty chosen response)" in (
        capsys.readouterr().out
    )
    args.num_examples = 100  # more than the split holds: every row, in order
    assert len(eval_winrate.load_examples(args, None)) == 11


def test_the_hh_reward_normalisation_samples_every_subset(tokenizer, tmp_path):
    """The HH reward is centred on the chosen responses of --max-norm-samples training pairs, evenly spaced over the
    split (its first pairs are harmless-base's alone)."""
    path = hh_subsets(tmp_path)
    pairs = reward_model.build_pairs(
        reward_model.Args(task="hh", dataset_name=path, response_length=16), tokenizer, "train", None
    )
    args = reward_model.Args(task="hh", dataset_name=path, max_norm_samples=3)
    sequences = [tokenizer.decode(s) for s in reward_model.normalisation_sequences(args, tokenizer, pairs)]
    assert [s.split("Human: ")[1].split("\n")[0] for s in sequences] == ["harmless 0", "harmless 3", "helpful 2"]


@pytest.mark.parametrize("script", [sft, reward_model, dpo_baseline, hypo], ids=lambda m: m.__name__)
def test_max_samples_are_spread_over_the_split_and_errors_name_the_split_row(script, tokenizer, tmp_path, capsys):
    """--max-train-samples and --max-eval-samples take rows evenly spaced over the split, not its first ones (on HH, the
    first 2,312 test rows are harmless-base's alone). A bad row is named by its index in the whole split."""
    path = hh_subsets(tmp_path)  # 12 rows; row 6's chosen response is empty
    build = script.build_examples if script is sft else script.build_pairs
    args = script.Args(task="hh", dataset_name=path, response_length=16)
    kept = build(args, tokenizer, "train", 4)  # rows 0, 3, 6 (empty: skipped) and 9
    assert [tokenizer.decode(x[0]).split("Human: ")[1].split("\n")[0] for x in kept] == [
        "harmless 0",
        "harmless 3",
        "helpful 3",
    ]
    assert "'rows': 4" in capsys.readouterr().out
    assert len(build(args, tokenizer, "train", 100)) == len(build(args, tokenizer, "train", None)) == 11
    rows = [json.loads(line) for line in open(path)]
    rows[9]["rejected"] = 7
    args.dataset_name = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SystemExit, match=r"row 9, column 'rejected': expected str, got int"):
        build(args, tokenizer, "train", 4)
    assert len(build(args, tokenizer, "train", 3)) == 3  # rows 0, 4, 8: row 9 never read


def test_the_tldr_reward_normalisation_samples_evenly_and_names_the_split_row(tokenizer, tmp_path):
    """The TL;DR reward is centred on the reference summaries of --max-norm-samples rows evenly spaced over the SFT
    split, as HH's, not its first rows (a split's order is not a sample); a bad row is named by its index in the split."""
    rows = [{"subreddit": "pets", "title": f"t {i}", "post": f"post {i}", "summary": f"cat {i}"} for i in range(12)]
    args = reward_model.Args(task="tldr", norm_dataset_name=write(tmp_path / "sft.jsonl", rows), max_norm_samples=4)
    sequences = [tokenizer.decode(s) for s in reward_model.normalisation_sequences(args, tokenizer, [])]
    assert [s.split("TL;DR:")[1].split("<")[0].strip() for s in sequences] == ["cat 0", "cat 3", "cat 6", "cat 9"]
    rows[9]["summary"] = 5
    args.norm_dataset_name = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SystemExit, match=r"row 9, column 'summary': expected str, got int"):
        reward_model.normalisation_sequences(args, tokenizer, [])
