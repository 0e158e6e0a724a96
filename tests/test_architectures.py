"""Every script on three causal-LM families as the Hub stores them: GPT-NeoX saved in fp16 with a padded vocabulary
(Pythia), Llama saved in bf16 (RMSNorm, no biases, tied embeddings, a tokenizer that adds a BOS and has no pad token,
a padded vocabulary), GPT-2 saved in fp32 (learned absolute positions, tied embeddings, no pad token). Cheap checks
run on all three in-process; the whole pipeline (SFT, reward model, PPO, both DR-PO scripts, REBEL, online DPO, HyPO,
DPO, eval_winrate) runs on each, a few updates per stage."""

import json
import math

import pytest
import torch
from conftest import SMALL, metrics_file
from conftest import run_script as run_one
from safetensors import safe_open
from test_hypo import FLAGS as HYPO_FLAGS
from test_online_dpo import SMALL_ONLINE
from test_rebel import SMALL_REBEL
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import drpo_hh
import ppo_baseline
import reward_model
import sft

ARCHS = ["gpt_neox", "llama", "gpt2"]
STORED = {"gpt_neox": torch.float16, "llama": torch.bfloat16, "gpt2": torch.float32}  # as the Hub stores Pythia, Llama, GPT-2


def build_tokenizer(arch, texts):
    """A byte-level BPE trained offline, with the special tokens and conventions of the family."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, kwargs = {
        "gpt_neox": (
            ["<|endoftext|>", "<|padding|>"],
            dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|padding|>"),
        ),
        "llama": (["<unk>", "<s>", "</s>"], dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")),  # no pad token
        "gpt2": (["<|endoftext|>"], dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")),
    }[arch]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    if arch == "llama":  # Llama's tokenizer puts a BOS before every text it encodes
        bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **kwargs)


def test_a_sentencepiece_response_continues_its_prompt(tmp_path):
    """Llama-2's tokenizer is SentencePiece-style (a Metaspace '▁' for each space, one prepended to the text), and its
    Hub tokenizer.json holds the legacy normalizer (prepend '▁', then every space to '▁'), under which " my cat" alone
    would start with a doubled '▁'. transformers 5 loads it as LlamaTokenizer, which rebuilds its own Metaspace: a
    response encoded on its own with its leading space (response_ids) is exactly the tokens that follow the prompt
    when both are encoded as one text, so a reset prefix is a state the policy could write itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    texts = ["TL;DR: my cat is sick", "my dog is old", "the cat sat on my mat"] * 20
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(sp.to_str())["model"]
    LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]]).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    saved["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                           {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}  # fmt: skip
    saved["pre_tokenizer"] = None  # as the Llama-2 file on the Hub
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    tokenizer = ppo_baseline.load_tokenizer(str(tmp_path))
    prompt = ppo_baseline.encode(tokenizer, "TL;DR:", special=False)
    whole = ppo_baseline.encode(tokenizer, "TL;DR: my cat is sick", special=False)
    response = sft.response_ids(tokenizer, "my cat is sick")
    assert whole[: len(prompt)] == prompt and response == whole[len(prompt) :] + [tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens(response[:1]) == ["\u2581my"]  # one '▁', not two


def test_a_tokenizer_that_appends_an_eos_to_every_text_is_refused(world, tmp_path):
    """A tokenizer saved with add_eos_token (some Llama fine-tunes) ends every text it encodes with an EOS: every prompt
    would end in one, before the response. Every script refuses it with a clear error; the same tokenizer without the
    setting loads."""
    from transformers import LlamaTokenizer

    vocab, merges = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3, "a": 4, "\u2581a": 5}, [("\u2581", "a")]
    LlamaTokenizer(vocab=vocab, merges=merges, add_eos_token=True).save_pretrained(tmp_path / "eos")
    LlamaTokenizer(vocab=vocab, merges=merges).save_pretrained(tmp_path / "plain")
    for script in (ppo_baseline, sft, drpo_hh, reward_model):  # one copy of load_tokenizer (tests/test_copies.py)
        with pytest.raises(SystemExit, match="appends an EOS to every text"):
            script.load_tokenizer(str(tmp_path / "eos"))
        assert script.load_tokenizer(str(tmp_path / "plain")).encode("a")[-1] != 2
    flags = ["--dataset-name", world / "tldr_sft", "--split", "validation", "--judge", "rm", "--judge-model", world / "rm"]
    proc = run_one("eval_winrate.py", "--model-paths", tmp_path / "eos", *flags, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "appends an EOS to every text" in proc.stdout


def build_model(arch, tokenizer):
    torch.manual_seed(0)
    rows = (
        448 if arch != "gpt2" else len(tokenizer)
    )  # Pythia-1B: 50304 embedding rows for ~50280 tokens; GPT-2: as many as tokens
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "gpt_neox":
        return GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=rows,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=512,
                tie_word_embeddings=False,
                pad_token_id=tokenizer.pad_token_id,
                **ids,
            )
        )
    if arch == "llama":
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=rows,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
                max_position_embeddings=512,
                tie_word_embeddings=True,
                **ids,
            )
        )
    return GPT2LMHeadModel(GPT2Config(vocab_size=rows, n_embd=32, n_layer=2, n_head=4, n_positions=512, **ids))


@pytest.fixture(scope="session")
def arch_folders(world, tmp_path_factory):
    """{name: folder}: {folder}/base holds the family's tokenizer and model, saved in the family's Hub dtype."""
    rows = [json.loads(x) for x in open(world / "tldr_sft" / "train.jsonl")]
    texts = [sft.TLDR_FORMAT.format(**r) + " " + r["summary"] for r in rows] + [
        json.loads(x)["chosen"] for x in open(world / "hh" / "train.jsonl")
    ]
    folders = {}
    for name in ARCHS:
        folders[name] = tmp_path_factory.mktemp(name)
        tokenizer = build_tokenizer(name, texts)
        build_model(name, tokenizer).to(STORED[name]).save_pretrained(folders[name] / "base")
        tokenizer.save_pretrained(folders[name] / "base")
    return folders


@pytest.fixture(params=ARCHS)
def arch(request, arch_folders):
    return request.param, arch_folders[request.param]


def stored_dtypes(folder):
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


# ---- cheap checks, in-process ----


def test_the_checkpoints_are_stored_as_the_hub_stores_them(arch):
    name, out = arch
    assert stored_dtypes(out / "base") == {{torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[STORED[name]]}
    assert AutoModelForCausalLM.from_pretrained(out / "base").dtype == STORED[name]  # transformers 5 loads what is stored


def test_tokenizer_conventions(arch):
    name, out = arch
    tokenizer = ppo_baseline.load_tokenizer(str(out / "base"))
    head = [tokenizer.bos_token_id] if name == "llama" else []
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token == ("<|padding|>" if name == "gpt_neox" else "[PAD]")  # added where the family has none
    # a response has no BOS inside, one leading space and the EOS id; a prompt starts with the tokenizer's BOS
    assert sft.response_ids(tokenizer, "my cat .") == tokenizer.encode(" my cat .", add_special_tokens=False) + [
        tokenizer.eos_token_id
    ]
    query, _ = ppo_baseline.tldr_query(tokenizer, {"subreddit": "pets", "title": "my cat", "post": "a\nb"}, 512)
    assert query[: len(head)] == head and query.count(tokenizer.bos_token_id) == len(head)
    # a long HH prompt keeps its end and its BOS, within the budget
    prompt = "\n\nHuman: " + "my cat is old . " * 40 + "\n\nAssistant:"
    ids, truncated = drpo_hh.hh_prompt(tokenizer, prompt, 32)
    body = tokenizer.encode(prompt, add_special_tokens=False)
    assert truncated and len(ids) == 32 and ids == head + body[len(body) - 32 + len(head) :]
    assert drpo_hh.hh_prompt(tokenizer, prompt, 4096) == (tokenizer.encode(prompt), False)


def test_no_dropout_even_where_a_layer_reads_its_rate_from_the_config(arch, tmp_path):
    """N+ trains without dropout. nn.Dropout's p = 0 is not enough where a layer applies dropout at a rate it keeps from
    the config (OPT's dropout is 0.1; Llama's and GPT-NeoX's attention_dropout): the sampled and the trained log-probs
    would differ. Every rate of the config is 0 at load, so two passes in train mode agree to the last bit."""
    from transformers import AutoConfig, OPTConfig, OPTForCausalLM

    name, out = arch
    tokenizer = ppo_baseline.load_tokenizer(str(out / "base"))
    config = AutoConfig.from_pretrained(out / "base").to_dict()
    rates = {k: 0.1 for k, v in config.items() if "drop" in k and isinstance(v, float)}
    AutoModelForCausalLM.from_pretrained(out / "base", **rates).save_pretrained(tmp_path / "dropout")  # the family's rates
    opt = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2, ffn_dim=64,
                    num_attention_heads=4, max_position_embeddings=64, dropout=0.1, attention_dropout=0.1)  # fmt: skip
    OPTForCausalLM(opt).save_pretrained(tmp_path / "opt")
    ids = torch.tensor([tokenizer.encode("my cat is old .")] * 2)
    for folder in ("dropout", "opt"):
        for cls in (AutoModelForCausalLM, AutoModelForSequenceClassification):  # the policy, and a value or reward model
            model = ppo_baseline.from_pretrained(cls, str(tmp_path / folder), tokenizer, num_labels=1).train()
            assert torch.equal(*(model(input_ids=ids).logits for _ in range(2))), (folder, cls.__name__)


def test_reward_fn_gets_the_prompt_and_response_as_text_without_special_tokens(arch):
    """--reward-fn scores text: the prompt as the data wrote it, not with the tokenizer's BOS (`<s>` for Llama) in front."""
    name, out = arch
    tokenizer = ppo_baseline.load_tokenizer(str(out / "base"))
    row = {"subreddit": "pets", "title": "my cat", "post": "a\nb"}
    query, _ = ppo_baseline.tldr_query(tokenizer, row, 512)
    response = torch.tensor([sft.response_ids(tokenizer, "my cat .") + [tokenizer.pad_token_id]])
    seen = []
    record = lambda prompts, responses: seen.append((prompts, responses)) or [0.0]  # noqa: E731
    batch = ppo_baseline.left_pad([query], tokenizer.pad_token_id)
    ppo_baseline.score_responses(None, record, tokenizer, [query], batch, response, None, 8)
    body = tokenizer.decode(query[1:] if name == "llama" else query)  # the prompt's text after its BOS
    assert seen == [([body], [tokenizer.decode(response[0, :-2])])] and not body.startswith(tokenizer.bos_token)


def test_value_and_reward_heads_read_like_transformers(arch):
    """token_scores (the value model at every token, the reward model at the EOS) equals the family's own sequence
    classification, left-padded or right-padded: position ids follow the real tokens."""
    name, out = arch
    tokenizer = ppo_baseline.load_tokenizer(str(out / "base"))
    pad = tokenizer.pad_token_id
    model = AutoModelForSequenceClassification.from_pretrained(
        out / "base", num_labels=1, pad_token_id=pad, dtype=torch.float32
    ).eval()
    model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings))
    seqs = [
        tokenizer.encode("my cat is old .") + [tokenizer.eos_token_id],
        tokenizer.encode("my dog .") + [tokenizer.eos_token_id],
    ]
    width = max(map(len, seqs))
    right = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    left = ppo_baseline.left_pad(seqs, pad)
    with torch.no_grad():
        theirs = model(input_ids=right, attention_mask=(right != pad).long()).logits[:, 0]
        for batch in (left, right):
            ours = ppo_baseline.token_scores(model, batch, pad).gather(
                1, ppo_baseline.last_token_index(batch, pad).unsqueeze(1)
            )[:, 0]
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_pair_rewards_share_the_prompt_and_equal_two_whole_passes(arch):
    """reward_model.pair_rewards encodes each prompt once and runs chosen and rejected on its cache: the rewards and
    the gradient of the Bradley-Terry loss equal those of the whole sequences (get_reward), with prompts and
    responses of different lengths (left- and right-padding inside one micro-batch)."""
    name, out = arch
    tokenizer = reward_model.load_tokenizer(str(out / "base"))
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    model = AutoModelForSequenceClassification.from_pretrained(
        out / "base", num_labels=1, pad_token_id=pad, dtype=torch.float32
    )
    model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings))
    texts = [
        ("my cat is old and sick .", "vet", "my car"),
        ("money ?", "save money now please", "no"),
        ("school is hard . help", "study", "ok then"),
    ]
    pairs = [
        (
            tokenizer.encode(q),
            tokenizer.encode(" " + c, add_special_tokens=False) + [eos],
            tokenizer.encode(" " + r, add_special_tokens=False) + [eos],
        )
        for q, c, r in texts
    ]
    grads = []
    for shared in (True, False):
        model.zero_grad()
        if shared:
            chosen, rejected = reward_model.pair_rewards(model, pairs, pad, "cpu")
        else:
            sequences = reward_model.pad_right([q + c for q, c, _ in pairs] + [q + r for q, _, r in pairs], pad, "cpu")
            chosen, rejected = reward_model.get_reward(model, sequences, pad).split(len(pairs))
        reward_model.bt_loss(chosen, rejected).backward()
        grads.append(
            (
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                chosen.detach(),
                rejected.detach(),
            )
        )
    (g_shared, c_shared, r_shared), (g_whole, c_whole, r_whole) = grads
    torch.testing.assert_close(c_shared, c_whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(r_shared, r_whole, atol=1e-5, rtol=0)
    assert set(g_shared) == set(g_whole) and len(g_whole) > 10
    for n in g_whole:
        torch.testing.assert_close(g_shared[n], g_whole[n], atol=1e-5, rtol=1e-4)


def test_sampling_and_training_use_the_same_distribution_and_never_write_a_non_token(arch):
    """The rollout's log-probs (our forward pass, left padding, temperature, non-tokens at probability 0) equal those
    of the distribution generate() sampled from; no pad token and no id past the tokenizer is ever written (generate's
    settings as train() sets them; the scripts' own rollout: test_a_policy_whose_pad_logit_is_largest_never_writes_it)."""
    name, out = arch
    tokenizer = ppo_baseline.load_tokenizer(str(out / "base"))
    pad = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).eval()
    model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings))
    non_tokens = ppo_baseline.non_token_ids(tokenizer, model.get_input_embeddings().num_embeddings)
    assert non_tokens[0] == pad and len(non_tokens) == (1 if name == "gpt2" else 448 - len(tokenizer) + 1)
    queries = ppo_baseline.left_pad(
        [tokenizer.encode("my cat is"), tokenizer.encode("TITLE: help with my old dog and")] * 32, pad
    )
    torch.manual_seed(0)
    with torch.no_grad():
        out_ = model.generate(
            input_ids=queries,
            attention_mask=(queries != pad).long(),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=True,
            temperature=0.7 + 1e-7,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad,
            eos_token_id=None,
            suppress_tokens=non_tokens,
            output_scores=True,
            return_dict_in_generate=True,
        )
        responses = out_.sequences[:, queries.shape[1] :]
        sampled = torch.stack(out_.scores, 1).log_softmax(-1).gather(2, responses.unsqueeze(-1)).squeeze(-1)
        ours = ppo_baseline.response_logprobs(model, out_.sequences, responses, pad, 0.7, non_tokens)
    assert not torch.isin(responses, torch.tensor(non_tokens)).any()
    torch.testing.assert_close(ours, sampled, atol=2e-4, rtol=0)


def test_fold_bias_is_exact_where_the_final_norm_has_a_bias(arch):
    name, out = arch
    model = AutoModelForSequenceClassification.from_pretrained(
        out / "base", num_labels=1, pad_token_id=0, dtype=torch.float32
    ).eval()
    ids = torch.randint(2, 300, (4, 9))
    with torch.no_grad():
        before = reward_model.get_reward(model, ids, 0)
        weights = {k: v.clone() for k, v in model.state_dict().items()}  # as reward_model.py folds the gathered weights
        folded = reward_model.fold_bias(weights, model.base_model_prefix, -2.5)
        model.load_state_dict(weights)
        after = reward_model.get_reward(model, ids, 0)
    assert folded == (name != "llama")  # Llama's RMSNorm has no bias: nothing changes, the shift goes to the config
    torch.testing.assert_close(after, before - 2.5 if folded else before, atol=1e-5, rtol=0)


def test_lora_targets_the_architectures_linear_layers(arch):
    from peft import LoraConfig, get_peft_model

    name, out = arch
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    )  # as the scripts
    targeted = {n.split(".")[-2] for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    assert (
        targeted
        == {
            "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
            "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
            "gpt2": {"c_attn", "c_proj", "c_fc"},
        }[name]
    )  # every linear layer but the LM head (GPT-2's are Conv1D)


# ---- the whole pipeline on each family ----


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
def test_the_pipeline_runs_on_every_architecture(name, arch_folders, world, tmp_path):
    """Each family in a test of its own (pytest-xdist spreads them over the workers). Not threads in one process:
    transformers' loading sets process-wide state (the default dtype, the init and tying switches), so two loads in
    threads of one process can leave each other a wrong model."""
    pipeline(name, arch_folders[name], world, tmp_path / name)


def pipeline(name, out, world, tmp_path):
    tmp_path.mkdir()
    data = dict(tldr=world / "tldr_sft", comparisons=world / "tldr_comparisons", hh=world / "hh")

    def run_script(*args, **kwargs):  # one thread a run: two workers share the two cores
        return run_one(*args, env={"OMP_NUM_THREADS": "1"}, **kwargs)

    few = ["--lr", 1e-3, "--batch-size", 32, "--local-micro-batch-size", 32, "--response-length", 16, "--max-eval-samples", 64]

    # SFT from the stored dtype: fp32 master weights, they move and the loss falls; the saved config says float32
    sft_flags = [
        "--dataset-name",
        data["tldr"],
        *few,
        "--lr",
        3e-3,
        "--batch-size",
        8,
        "--local-micro-batch-size",
        8,
        "--max-train-samples",
        256,
        "--eval-every",
        16,
    ]  # 32 updates
    proc = run_script("sft.py", "--base-model", out / "base", *sft_flags, "--output-dir", tmp_path / "sft", cwd=tmp_path)
    assert "dtypes: trained weights float32" in proc.stdout
    evals = [float(x.split("eval_loss=")[1].split()[0]) for x in proc.stdout.splitlines() if "eval_loss=" in x]
    uniform = math.log(AutoModelForCausalLM.from_pretrained(out / "base").config.vocab_size)  # about the random init's loss
    assert len(evals) == 2 and evals[1] < evals[0] - 0.1 and evals[1] < uniform - 1.5, evals
    assert (
        stored_dtypes(tmp_path / "sft") == {"F32"} and json.load(open(tmp_path / "sft" / "config.json"))["dtype"] == "float32"
    )
    base, tuned = (
        AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).state_dict() for p in (out / "base", tmp_path / "sft")
    )
    matrices = [k for k, v in base.items() if v.dim() == 2]
    assert len(matrices) >= 8 and all(not torch.equal(base[k], tuned[k]) for k in matrices)  # every weight matrix moved
    if name == "gpt_neox":  # the fp16 checkpoint trains exactly as its weights upcast to fp32 and stored so
        AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).save_pretrained(tmp_path / "base32")
        sft.load_tokenizer(str(out / "base")).save_pretrained(tmp_path / "base32")
        run_script("sft.py", "--base-model", tmp_path / "base32", *sft_flags, "--output-dir", tmp_path / "sft32", cwd=tmp_path)
        from32 = AutoModelForCausalLM.from_pretrained(tmp_path / "sft32").state_dict()
        assert all(torch.equal(tuned[k], from32[k]) for k in tuned)

    if name == "gpt2":  # --dtype bfloat16 trains and saves bf16 weights, whatever the checkpoint stores (fp32 here)
        proc = run_script(
            "sft.py",
            "--base-model",
            out / "base",
            *sft_flags,
            "--max-train-samples",
            16,
            "--dtype",
            "bfloat16",
            "--output-dir",
            tmp_path / "sft_bf16",
            cwd=tmp_path,
        )
        assert "dtypes: trained weights bfloat16" in proc.stdout and stored_dtypes(tmp_path / "sft_bf16") == {"BF16"}

    # reward model: saved, loadable by plain transformers, normalised (in the weights, or in the config for Llama)
    proc = run_script(
        "reward_model.py",
        "--sft-model-path",
        tmp_path / "sft",
        "--dataset-name",
        data["comparisons"],
        "--norm-dataset-name",
        data["tldr"],
        "--output-dir",
        tmp_path / "rm",
        *few,
        "--max-train-samples",
        256,
        "--max-norm-samples",
        256,
        cwd=tmp_path,
    )
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert rm.config.reward_bias_in_weights == (name != "llama") and rm.dtype == torch.float32
    tokenizer = reward_model.load_tokenizer(str(tmp_path / "rm"))
    sequences = reward_model.normalisation_sequences(
        reward_model.Args(norm_dataset_name=str(data["tldr"]), max_norm_samples=256), tokenizer, None
    )
    ids = reward_model.pad_right(sequences, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        plain = rm(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits[:, 0]
    # the RL scripts add the shift reward_model.py could not fold into the weights (ppo_baseline.score_responses)
    normalised = plain + (0.0 if rm.config.reward_bias_in_weights else rm.config.reward_bias)
    assert abs(normalised.mean().item()) < 1e-3 and normalised.std().item() > 0.01  # mean 0, and not a constant
    if name == "llama":  # what plain transformers gives: the raw score, the shift being in the config
        assert plain.mean().item() == pytest.approx(-rm.config.reward_bias, abs=1e-3) and abs(rm.config.reward_bias) > 1e-2

    # DR-PO on TL;DR (and on HH for Llama): the first ratio is 1 (rollout and training agree), trained weights are
    # fp32. (PPO is DR-PO without the reset: --reset-prob 0 equals ppo_baseline.py to the last digit, test_drpo.py)
    rl = ["--sft-model-path", tmp_path / "sft", "--reward-model-path", tmp_path / "rm", *SMALL, "--total-episodes", 64]
    runs = [("drpo_tldr.py", data["tldr"], ["--reset-prob", 0.5])]
    if name == "llama":  # HH prompts keep the tokenizer's BOS when they are cut: the case where the architecture matters
        runs.append(("drpo_hh.py", data["hh"], ["--reset-prob", 0.5]))
    for script, dataset, flags in runs:
        proc = run_script(script, *rl, *flags, "--dataset-name", dataset, "--output-dir", tmp_path / script[:-3], cwd=tmp_path)
        assert "dtypes: trained weights float32, frozen models float32" in proc.stdout
        log = [json.loads(x) for x in open(metrics_file(proc.stdout, tmp_path))]
        assert len(log) == 2 and all(
            abs(m["policy/first_ratio"] - 1) < 1e-5 and math.isfinite(m["objective/entropy"]) for m in log
        )
        assert all(m["reset/fraction"] > 0 for m in log)
        assert stored_dtypes(tmp_path / script[:-3]) == {"F32"}

    # the rest of the family, each from its first step where the policy is its own reference: REBEL with the reset
    # (d = 0 at the first minibatch), online DPO with K 3, max_min and the reset (loss log 2 at the first step), HyPO
    # (DPO's log 2 and an online KL of 0 at step 1); all save fp32 weights
    family = [
        ("rebel.py", [*rl[:4], *SMALL_REBEL, "--total-episodes", 64, "--reset-prob", 0.5, "--response-length", 16,
                      "--dataset-name", data["tldr"]]),
        ("online_dpo.py", [*rl[:4], *SMALL_ONLINE, "--total-episodes", 96, "--reset-prob", 0.5, "--response-length", 16,
                           "--num-generations", 3, "--pair-selection", "max_min", "--dataset-name", data["tldr"]]),
        ("hypo.py", ["--sft-model-path", tmp_path / "sft", *HYPO_FLAGS, "--max-train-samples", 64, "--eval-every", 0,
                     "--response-length", 16, "--batch-size", 16, "--num-generations", 3, "--kl-weight", 0.5,
                     "--dataset-name", data["comparisons"]]),
    ]  # fmt: skip
    for script, flags in family:
        proc = run_script(script, *flags, "--output-dir", tmp_path / script[:-3], cwd=tmp_path)
        assert "dtypes: trained weights float32" in proc.stdout
        log = [json.loads(x) for x in open(metrics_file(proc.stdout, tmp_path))]
        assert len(log) >= 2 and all(math.isfinite(v) for m in log for v in m.values() if isinstance(v, float))
        first = log[0]
        if script == "rebel.py":
            assert first["rebel/first_abs_d"] < 1e-5 and sum(m["reset/fraction"] for m in log) > 0
        elif script == "online_dpo.py":
            assert first["first_loss"] == pytest.approx(math.log(2), abs=1e-5) and sum(m["reset/fraction"] for m in log) > 0
        else:
            assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(first["online/kl"]) < 1e-4
        assert stored_dtypes(tmp_path / script[:-3]) == {"F32"}

    if name == "gpt_neox":  # from here on its SFT model is an fp32 GPT-NeoX: the tiny world's, in test_dpo.py and test_eval.py
        return
    # DPO: at step 0 the policy is the reference (loss log 2); with LoRA on GPT-2, whose linear layers are Conv1D
    lora = ["--use-lora", "--lora-r", 4] if name == "gpt2" else []
    proc = run_script(
        "dpo_baseline.py",
        "--sft-model-path",
        tmp_path / "sft",
        "--dataset-name",
        data["comparisons"],
        "--output-dir",
        tmp_path / "dpo",
        "--max-train-samples",
        64,
        "--max-eval-samples",
        16,
        "--batch-size",
        32,
        "--local-micro-batch-size",
        16,
        "--lr",
        1e-3,
        "--max-grad-norm",
        1.0,
        "--response-length",
        16,
        *lora,
        cwd=tmp_path,
    )
    first = [x for x in proc.stdout.splitlines() if x.startswith("update=1 ")][0]
    assert float(first.split(" loss=")[1].split()[0]) == pytest.approx(math.log(2), abs=1e-4)
    dpo, sft_weights = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (tmp_path / "dpo", tmp_path / "sft"))
    assert set(dpo) == set(sft_weights) and any(not torch.equal(dpo[k], sft_weights[k]) for k in dpo)

    # eval_winrate: generates from the DR-PO policy and judges with the reward model
    run_script(
        "eval_winrate.py",
        "--model-paths",
        tmp_path / "drpo_tldr",
        "--dataset-name",
        data["tldr"],
        "--split",
        "validation",
        "--num-examples",
        16,
        "--response-length",
        8,
        "--judge",
        "rm",
        "--judge-model",
        tmp_path / "rm",
        "--output-dir",
        tmp_path / "eval",
        "--cache-file",
        tmp_path / "eval" / "cache.jsonl",
        cwd=tmp_path,
    )
    summary = json.load(open(tmp_path / "eval" / "summary.json"))
    assert [s["n"] for s in summary["models"].values()] == [16]
