"""eval_winrate.py: the parser, the statistics, the OpenAI-compatible client against a local server (retries, 401,
cache, resume after a kill), and the hf and rm judges on the tiny world."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import ROOT, SHARED, requires_shared, run_script
from transformers import AutoModelForCausalLM, AutoTokenizer

import eval_winrate as ev


def test_parse_choice_is_strict():
    assert ev.parse_choice("Comparison: A is shorter.\nPreferred: A") == "A"
    assert ev.parse_choice('Comparison: x\nPreferred: "B"\n') == "B"
    assert ev.parse_choice("Comparison: x\nPreferred: A or B") is None
    assert ev.parse_choice("I prefer A") is None and ev.parse_choice("") is None
    assert ev.parse_choice("Preferred: B\nComparison: later text") is None  # the choice must be the last line


def test_the_answer_key_comes_from_the_template():
    assert ev.parse_choice("Comparison: x\nMore helpful: B", "More helpful") == "B"
    assert ev.parse_choice("Comparison: x\nPreferred: B", "More helpful") is None  # another key is not guessed
    assert ev.answer_key(open(f"{ROOT}/judge_prompts/dpo_hh.txt").read()) == "More helpful"
    assert ev.answer_key(open(f"{ROOT}/judge_prompts/dpo_tldr.txt").read()) == "Preferred"
    assert all(ev.answer_key(p) == "Preferred" for p in ev.PROMPTS.values())
    with pytest.raises(SystemExit, match="does not show the answer format"):
        ev.answer_key("Which is better?\n{prompt}\n{response_a}\n{response_b}")


def test_outcome_maps_both_orders_back_to_the_policy():
    assert ev.outcome("A", "B") == "win"  # policy first and chosen; reference first, policy (B) chosen
    assert ev.outcome("B", "A") == "loss"
    assert ev.outcome("A", "A") == "tie"  # position bias: always A
    assert ev.outcome(None, "B") == "tie"  # an unparseable reply is never guessed


def test_wilson_interval_known_values():
    low, high = ev.wilson_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    low, high = ev.wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and round(high, 4) == 0.2775
    s = ev.summarize(["win"] * 6 + ["tie"] * 2 + ["loss"] * 2, consistent=8, unparseable=1)
    assert (
        s["win_rate"] == 0.7
        and (s["wins"], s["ties"], s["losses"], s["n"]) == (6, 2, 2, 10)
        and s["position_consistency"] == 0.8
    )


@requires_shared
def test_gpt4_labels_of_the_real_slice_aggregate_to_65_3_percent():
    rows = [json.loads(x) for x in open(f"{SHARED}/data/tldr/comparisons_gpt4_dev.jsonl")]
    # summary 1 is OpenAI's PPO 1.3B sample, summary 0 the human reference; choice is GPT-4's judgement
    outcomes = ["win" if r["choice"] == 1 else "loss" for r in rows]
    s = ev.summarize(outcomes, consistent=len(rows), unparseable=0)
    assert (s["wins"], s["n"]) == (392, 600) and round(s["win_rate"], 3) == 0.653
    assert (round(s["ci95"][0], 3), round(s["ci95"][1], 3)) == (0.614, 0.690)


class Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that prefers 'good' to 'plain' to 'bad' answers. Scripted failures:
    the server's `script` list is consumed one status per request before answering normally."""

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        with server.lock:
            server.calls.append(text)
            status = server.script.pop(0) if server.script else 200
        time.sleep(server.delay)
        if status != 200:
            self.send_response(status)
            self.end_headers()
            return
        label = "Response" if "Response A:\n" in text else "Summary"  # the DPO paper's HH prompt, or a TL;DR one
        a = text.split(f"{label} A:\n")[1].split(f"\n\n{label} B:")[0]
        b = text.split(f"{label} B:\n")[1]
        choice = "A" if "good" in a or ("good" not in b and "plain" in a) else "B"  # good > plain > bad
        choice = getattr(server, "always", None) or choice  # a judge with a position bias, when the test sets one
        key = server.answer_key or text.strip().splitlines()[-1].split(":")[0]  # the format the prompt asks for
        content = f"Comparison: {choice} names the point.\n{key}: {choice}"
        with server.lock:  # a refusal or a content filter: `content` is null, when the test asks for some
            content, server.nulls = (None, server.nulls - 1) if server.nulls > 0 else (content, server.nulls)
        reply = {"choices": [{"message": {"content": content}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    httpd.calls, httpd.script, httpd.delay, httpd.lock, httpd.answer_key = [], [], 0.0, threading.Lock(), None
    httpd.nulls = 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def responses_file(tmp_path, n=10, good=6):
    path = tmp_path / "policy.jsonl"
    with open(path, "w") as f:
        for i in range(n):  # the first `good` responses are good, the references never are
            f.write(
                json.dumps(
                    {
                        "prompt": f"post {i}",
                        "response": f"good summary {i}" if i < good else f"bad summary {i}",
                        "reference": f"plain reference {i}",
                    }
                )
                + "\n"
            )
    return path


def judge_run(server, tmp_path, *flags, check=True, n=10):
    return run_script(
        "eval_winrate.py",
        "--responses-file",
        responses_file(tmp_path, n=n),
        "--judge",
        "openai",
        "--base-url",
        f"http://127.0.0.1:{server.server_port}/v1",
        "--backoff-s",
        "0.01",
        "--output-dir",
        tmp_path / "out",
        "--cache-file",
        tmp_path / "cache.jsonl",
        *flags,
        cwd=tmp_path,
        env={"OPENAI_API_KEY": "test"},
        check=check,
    )


def test_openai_judge_both_orders_retries_and_cache(server, tmp_path):
    server.script = [429, 500]  # a rate limit and a server error, both retried
    judge_run(server, tmp_path)
    summary = json.load(open(tmp_path / "out" / "summary.json"))["models"]["policy"]
    assert (summary["wins"], summary["losses"], summary["ties"]) == (6, 4, 0) and summary["position_consistency"] == 1.0
    assert len(server.calls) == 2 * 10 + 2  # both orders of 10 pairs, plus the 2 failed attempts
    rows = [json.loads(x) for x in open(tmp_path / "out" / "policy.jsonl")]
    assert rows[0]["outcome"] == "win" and rows[0]["judge_policy_first"] == "A" and rows[0]["judge_reference_first"] == "B"
    assert "Preferred: A" in rows[0]["raw_policy_first"] and (tmp_path / "out" / "policy.csv").exists()
    calls = len(server.calls)
    judge_run(server, tmp_path)  # everything is cached: no call at all
    assert len(server.calls) == calls
    assert json.load(open(tmp_path / "out" / "summary.json"))["judge_model"] == "gpt-4"  # the judge is recorded


def test_401_stops_and_keeps_the_cache(server, tmp_path):
    server.script = [200] * 5 + [401] * 100
    proc = judge_run(server, tmp_path, "--max-concurrency", "1", check=False)
    assert proc.returncode != 0 and "answered 401" in proc.stdout and "Traceback" not in proc.stdout
    kept = [json.loads(x) for x in open(tmp_path / "cache.jsonl")]
    assert len(kept) == 5
    server.script = []
    calls = len(server.calls)
    judge_run(server, tmp_path)
    assert len(server.calls) - calls == 20 - 5  # the rerun makes only the missing judgements


def test_resume_after_kill_judges_the_rest_and_none_twice(server, tmp_path):
    server.delay = 0.2
    cmd = [
        sys.executable,
        f"{ROOT}/eval_winrate.py",
        "--responses-file",
        str(responses_file(tmp_path, n=20)),
        "--judge",
        "openai",
        "--base-url",
        f"http://127.0.0.1:{server.server_port}/v1",
        "--max-concurrency",
        "2",
        "--output-dir",
        str(tmp_path / "out"),
        "--cache-file",
        str(tmp_path / "cache.jsonl"),
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env={**os.environ, "OPENAI_API_KEY": "t"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 60
    while len(server.calls) < 10 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len([x for x in open(tmp_path / "cache.jsonl")])
    assert 0 < done < 40
    server.delay = 0.0
    calls = len(server.calls)
    judge_run(server, tmp_path, "--max-concurrency", "2", n=20)
    assert len(server.calls) - calls == 40 - done  # only what the killed run had not cached
    keys = [json.loads(x)["key"] for x in open(tmp_path / "cache.jsonl")]
    assert len(keys) == 40 and len(set(keys)) == 40  # all 2 x 20 judged, none twice
    assert json.load(open(tmp_path / "out" / "summary.json"))["models"]["policy"]["n"] == 20


def test_a_judge_that_always_answers_a_gives_ties_not_wins(server, tmp_path):
    """Position bias: a judge that always answers A is inconsistent on every pair judged in both orders, so every pair
    is a tie and the win rate 0.5, whatever the responses."""
    server.always = "A"
    judge_run(server, tmp_path)
    s = json.load(open(tmp_path / "out" / "summary.json"))["models"]["policy"]
    assert (s["wins"], s["ties"], s["losses"], s["win_rate"], s["position_consistency"]) == (0, 10, 0, 0.5, 0.0)


def test_hf_judge_position_bias_becomes_ties(world, sft_model, tmp_path):
    """The real hf judge on a tiny model: each verdict is the likelier of ' A' and ' B' (the log-probs its reply
    records), and each pair's outcome follows from its two verdicts, an inconsistent pair a tie."""
    proc = run_script(
        "eval_winrate.py",
        "--responses-file",
        responses_file(tmp_path),
        "--judge",
        "hf",
        "--judge-model",
        sft_model,
        "--output-dir",
        tmp_path / "out",
        "--cache-file",
        tmp_path / "c.jsonl",
        cwd=tmp_path,
    )
    s = json.load(open(tmp_path / "out" / "summary.json"))["models"]["policy"]
    rows = [json.loads(x) for x in open(tmp_path / "out" / "policy.jsonl")]
    tokenizer, model = AutoTokenizer.from_pretrained(sft_model), AutoModelForCausalLM.from_pretrained(sft_model).eval()
    inputs = [json.loads(x) for x in open(responses_file(tmp_path))]
    for row, given in zip(rows, inputs, strict=True):
        for order in ("policy_first", "reference_first"):
            a, b = map(float, re.match(r"logp\(A\)=(\S+) logp\(B\)=(\S+)\n", row[f"raw_{order}"]).groups())
            assert row[f"judge_{order}"] == ("A" if a >= b else "B"), row
            # the same log-probs from a forward pass of our own: the filled template up to the answer key's last line,
            # which asks for the answer at once, then the next token's log-probs of " A" and " B"
            pair = (given["response"], given["reference"])[:: 1 if order == "policy_first" else -1]
            text = ev.PROMPTS["tldr"].format(prompt=given["prompt"], response_a=pair[0], response_b=pair[1])
            ids = tokenizer(text.rsplit("Preferred:", 1)[0] + "Comparison: -\nPreferred:", return_tensors="pt").input_ids
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0, -1].log_softmax(-1)
            expected = [logp[tokenizer(x).input_ids[-1]].item() for x in (" A", " B")]
            assert [a, b] == pytest.approx(expected, abs=1e-4), (row, expected)
        assert row["outcome"] == ev.outcome(row["judge_policy_first"], row["judge_reference_first"])
    outcomes = [row["outcome"] for row in rows]
    assert (s["n"], s["wins"], s["ties"], s["losses"]) == (10, *map(outcomes.count, ("win", "tie", "loss")))
    assert "win rate" in proc.stdout


def test_rm_judge_prefers_the_gold_preferred_response(world, reward_run, tmp_path):
    rows = [json.loads(x) for x in open(world / "tldr_comparisons" / "validation.jsonl")][:50]
    path = tmp_path / "gold.jsonl"
    with open(path, "w") as f:
        for r in rows:
            prompt = ev.TLDR_FORMAT.format(**r["info"])
            f.write(
                json.dumps(
                    {
                        "prompt": prompt,
                        "response": r["summaries"][r["choice"]]["text"],
                        "reference": r["summaries"][1 - r["choice"]]["text"],
                    }
                )
                + "\n"
            )
    run_script(
        "eval_winrate.py",
        "--responses-file",
        path,
        "--judge",
        "rm",
        "--judge-model",
        world / "rm",
        "--output-dir",
        tmp_path / "out",
        "--cache-file",
        tmp_path / "c.jsonl",
        cwd=tmp_path,
    )
    s = json.load(open(tmp_path / "out" / "summary.json"))["models"]["gold"]
    assert s["win_rate"] > 0.9 and s["ci95"][0] > 0.8


def test_rm_judge_counts_equal_scores_as_ties(world, reward_run, tmp_path):
    """A response that is its reference scores the same: a tie (half a win), not a loss."""
    rows = [json.loads(x) for x in open(world / "tldr_sft" / "validation.jsonl")][:8]
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps({"prompt": ev.TLDR_FORMAT.format(**r), "response": r["summary"],
                                        "reference": r["summary"]}) + "\n" for r in rows))  # fmt: skip
    flags = ["--judge", "rm", "--judge-model", world / "rm", "--output-dir", tmp_path / "out"]
    run_script("eval_winrate.py", "--responses-file", path, *flags, "--cache-file", tmp_path / "c.jsonl", cwd=tmp_path)
    s = json.load(open(tmp_path / "out" / "summary.json"))["models"]["same"]
    assert (s["wins"], s["ties"], s["losses"], s["win_rate"]) == (0, 8, 0, 0.5)


def test_rm_judge_scores_a_long_prompt_by_its_end_as_in_training(world, reward_run):
    """HH transcripts are long: the reward model scores the last --query-length tokens of the prompt, as the policy saw
    it and reward_model.py trained on it. Two prompts that differ only before those tokens score the same."""
    import torch
    from transformers import AutoModelForSequenceClassification

    tokenizer = ev.AutoTokenizer.from_pretrained(world / "rm")
    model = AutoModelForSequenceClassification.from_pretrained(world / "rm").eval()
    tail = "\n\nHuman: my cat is sick, what should I do?\n\nAssistant:"
    prompts = ["\n\nHuman: hello there, old friend" * 6 + tail, "\n\nHuman: a dog, a pet, a walk" * 6 + tail]
    n = len(ev.encode(tokenizer, tail, special=False))
    assert ev.prompt_ids(tokenizer, prompts[0], n) == ev.prompt_ids(tokenizer, prompts[1], n)  # the same last n tokens
    assert len(ev.encode(tokenizer, prompts[0])) > 3 * n
    scores = ev.reward_scores(model, tokenizer, prompts, ["take it to a vet"] * 2, torch.device("cpu"), 2, n)
    full = ev.reward_scores(model, tokenizer, prompts, ["take it to a vet"] * 2, torch.device("cpu"), 2, 10**6)
    assert scores[0] == pytest.approx(scores[1], abs=1e-5) and abs(full[0] - full[1]) > 1e-3


def test_end_to_end_generate_and_judge(world, sft_model, reward_run, tmp_path):
    proc = run_script(
        "eval_winrate.py",
        "--model-paths",
        world / "base",
        sft_model,
        "--dataset-name",
        world / "tldr_sft",
        "--split",
        "validation",
        "--num-examples",
        24,
        "--response-length",
        8,
        "--judge",
        "rm",
        "--judge-model",
        world / "rm",
        "--output-dir",
        tmp_path / "out",
        "--cache-file",
        tmp_path / "c.jsonl",
        cwd=tmp_path,
    )
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    base, sft = summary["models"][str(world / "base")], summary["models"][str(sft_model)]
    assert base["n"] == sft["n"] == 24 and sft["win_rate"] > base["win_rate"]  # the SFT policy beats random init
    assert sft["mean_response_tokens"] > 0 and sft["mean_reference_tokens"] > 0
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".jsonl")]) == 2 and "win rate" in proc.stdout


def test_random_order_halves_the_calls_and_maps_back(server, tmp_path):
    judge_run(server, tmp_path, "--order", "random")
    s = json.load(open(tmp_path / "out" / "summary.json"))["models"]["policy"]
    assert len(server.calls) == 10 and (s["wins"], s["losses"], s["ties"]) == (6, 4, 0)  # one order each, mapped back
    rows = [json.loads(x) for x in open(tmp_path / "out" / "policy.jsonl")]
    assert [r["outcome"] for r in rows] == ["win"] * 6 + ["loss"] * 4
    # each reply is kept under the order the judge was shown (policy first for some rows, reference first for others)
    shown = {r["prompt"]: next(c for c in server.calls if f"{r['prompt']}\n" in c) for r in rows}
    policy_first = [shown[r["prompt"]].index(r["response"]) < shown[r["prompt"]].index(r["reference"]) for r in rows]
    assert 0 < sum(policy_first) < len(rows)
    for r, first in zip(rows, policy_first):
        assert (r["raw_policy_first"] != "", r["raw_reference_first"] != "") == (first, not first), r


def test_judge_prompt_file_is_used_and_part_of_the_cache_key(server, tmp_path):
    template = tmp_path / "paper_prompt.txt"
    template.write_text("PAPER PROMPT\n{prompt}\nSummary A:\n{response_a}\n\nSummary B:\n{response_b}\nPreferred: <A or B>")
    judge_run(server, tmp_path)
    calls = len(server.calls)
    judge_run(server, tmp_path, "--judge-prompt-file", template)
    assert len(server.calls) - calls == 20 and server.calls[-1].startswith("PAPER PROMPT")  # another template: new calls
    assert json.load(open(tmp_path / "out" / "summary.json"))["judge_prompt"].startswith("PAPER PROMPT")


@pytest.mark.parametrize("prompt_file", ["dpo_hh.txt", "dpo_tldr.txt"])
def test_the_dpo_papers_prompts_are_parsed(server, tmp_path, prompt_file):
    """The DPO paper's HH prompt asks for `More helpful: A`; parsing only `Preferred:` made every pair a tie (0.500)."""
    judge_run(server, tmp_path, "--judge-prompt-file", f"{ROOT}/judge_prompts/{prompt_file}")
    s = json.load(open(tmp_path / "out" / "summary.json"))["models"]["policy"]
    assert (s["wins"], s["losses"], s["ties"], s["unparseable"]) == (6, 4, 0, 0) and s["win_rate"] == 0.6


def test_mostly_unparseable_judgements_stop_with_an_error_not_a_table(server, tmp_path):
    server.answer_key = "Verdict"  # a judge answering in another format than the prompt asks for
    proc = judge_run(server, tmp_path, check=False)
    assert (
        proc.returncode != 0 and "20 of 20 judgements could not be parsed" in proc.stdout and "`Preferred: A`" in proc.stdout
    )
    assert "Verdict: " in proc.stdout and "win rate" not in proc.stdout and "Traceback" not in proc.stdout
    assert len(open(tmp_path / "cache.jsonl").readlines()) == 20  # the replies are kept
    calls = len(server.calls)
    judge_run(server, tmp_path, "--judge-answer-key", "Verdict")  # read with the right key: from the cache, no call
    s = json.load(open(tmp_path / "out" / "summary.json"))["models"]["policy"]
    assert len(server.calls) == calls and (s["wins"], s["losses"]) == (6, 4)


def test_the_cache_keys_a_judgement_by_the_endpoint_and_the_judge_kind(server, tmp_path):
    """One model name at two endpoints (or a local hf judge of the Hub id an endpoint serves) is two judges: a cache made
    by one must not answer for the other. The OpenAI API's keys are those older caches hold."""
    judge_run(server, tmp_path)
    calls = len(server.calls)
    judge_run(server, tmp_path, "--base-url", f"http://localhost:{server.server_port}/v1")  # the later flag wins
    assert len(server.calls) - calls == 20  # another endpoint: judged again, not read from the first one's replies
    args = ev.Args(judge_model="m")
    kinds = ({}, {"judge": "hf"}, {"base_url": "http://x/v1"}, {"judge": "hf", "dtype": "bfloat16"})
    ids = {ev.judge_id(ev.Args(judge_model="m", **kw), "Preferred") for kw in kinds}
    ids.add(ev.judge_id(ev.Args(judge_model="m", judge="hf"), "More helpful"))  # a local judge is prompted with the key
    assert len(ids) == 5 and ev.judge_id(args, "Preferred") == "m"  # the OpenAI API: the model name alone, as before
    assert ev.judge_id(args, "More helpful") == "m"  # its replies are re-parsed with today's key


def test_a_null_reply_is_unparseable_not_a_crash(server, tmp_path):
    """An endpoint may answer a refusal with `content: null`: that judgement is counted as unparseable (its pair a
    tie), and the run goes on."""
    server.nulls = 3
    judge_run(server, tmp_path)
    s = json.load(open(tmp_path / "out" / "summary.json"))["models"]["policy"]
    rows = [json.loads(x) for x in open(tmp_path / "out" / "policy.jsonl")]
    hit = [r for r in rows if "" in (r["raw_policy_first"], r["raw_reference_first"])]  # a null reply is kept as ""
    assert s["unparseable"] == 3 and s["n"] == 10 and len(hit) in (2, 3)  # 3 replies: 2 pairs, or 3
    assert s["ties"] == len(hit) and all(r["outcome"] == "tie" for r in hit)  # the others are consistent (the server)
    assert s["wins"] + s["ties"] + s["losses"] == 10


def test_the_judge_sees_each_response_stripped_as_in_n_plus(server, tmp_path):
    """N+ strips both summaries before judging: a policy's trailing newline or a reference's leading space must not be a
    cue to the judge. What the judge is sent holds each response stripped, and the cache is keyed by what was sent."""
    path = tmp_path / "spaced.jsonl"
    path.write_text(json.dumps({"prompt": "post", "response": " good summary \n\n", "reference": " plain reference"}) + "\n")
    flags = ["--base-url", f"http://127.0.0.1:{server.server_port}/v1", "--output-dir", tmp_path / "out"]
    run_script("eval_winrate.py", "--responses-file", path, *flags, "--cache-file", tmp_path / "c.jsonl", cwd=tmp_path,
               env={"OPENAI_API_KEY": "test"})  # fmt: skip
    assert len(server.calls) == 2
    first, second = sorted(server.calls, key=lambda text: text.index("good"))  # the policy's response shown as A, then B
    assert "Summary A:\ngood summary\n\nSummary B:\nplain reference\n\nFIRST" in first
    assert "Summary A:\nplain reference\n\nSummary B:\ngood summary\n\nFIRST" in second


def test_rm_judge_scores_a_response_with_no_eos_as_training_does(world, reward_run):
    """A generated response cut off before its EOS scores --missing-eos-penalty (-1, as in training), not the reward of a
    response that ended: against itself as the reference it loses where the reference scores above -1, and wins where
    below; the same response that did end ties. A responses file (nothing known of the EOS) is scored as it is."""
    import torch

    tokenizer = ev.AutoTokenizer.from_pretrained(world / "rm")
    model = ev.load_model(ev.AutoModelForSequenceClassification, str(world / "rm"), "float32", torch.device("cpu"))
    rows = [json.loads(x) for x in open(world / "tldr_sft" / "validation.jsonl")][:8]
    prompts, texts = [ev.TLDR_FORMAT.format(**r) for r in rows], [" " + r["summary"] for r in rows]
    ended = [True, False] * 4
    system = ev.System(prompts, texts, texts, [1] * 8, [1] * 8, ended)
    scores = ev.reward_scores(model, tokenizer, prompts, texts, torch.device("cpu"), 8, 512)
    judged = ev.judge_by_reward(model, tokenizer, system, torch.device("cpu"), ev.Args())
    outcomes = [ev.outcome(j.judge_policy_first, j.judge_reference_first) for j in judged]
    assert outcomes == ["tie" if e else ("loss" if s > -1 else "win") for e, s in zip(ended, scores)]
    assert "loss" in outcomes
    kept = ev.judge_by_reward(model, tokenizer, system._replace(ended=None), torch.device("cpu"), ev.Args())
    assert [ev.outcome(*j[:2]) for j in kept] == ["tie"] * 8


def test_each_policy_samples_from_the_seed_whatever_came_before(world, sft_model, reward_run, tmp_path):
    """Sampling is seeded per policy: a policy's responses (at temperature 1, where seeds matter) are the same judged
    after another policy as alone; the base model, random and cut off, mostly writes no EOS and is counted."""
    flags = ["--dataset-name", world / "tldr_sft", "--split", "validation", "--num-examples", 16, "--response-length", 8,
             "--temperature", 1.0, "--judge", "rm", "--judge-model", world / "rm"]  # fmt: skip
    flags += ["--cache-file", tmp_path / "c.jsonl"]
    run_script("eval_winrate.py", "--model-paths", world / "base", sft_model, *flags, "--output-dir", tmp_path / "both",
               cwd=tmp_path)  # fmt: skip
    run_script("eval_winrate.py", "--model-paths", sft_model, *flags, "--output-dir", tmp_path / "alone", cwd=tmp_path)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(sft_model)).strip("_")
    both, alone = ([json.loads(x)["response"] for x in open(tmp_path / d / f"{stem}.jsonl")] for d in ("both", "alone"))
    assert both == alone and len(set(both)) > 4
    models = json.load(open(tmp_path / "both" / "summary.json"))["models"]
    assert models[str(world / "base")]["responses_without_eos"] > 8 > models[str(sft_model)]["responses_without_eos"]
