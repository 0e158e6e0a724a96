# Builds the offline "tiny world": a tokenizer, a random-init tiny GPT-NeoX and small TL;DR / HH
# datasets in the exact Hub schemas, with a known gold preference. See README.md, "The tiny world".
#
# The gold preference: every prompt is about one topic (pets, cars, food, ...). A response is good
# when the nouns it names belong to the prompt's topic, and bad when they come from other topics.
# `gold_reward` below scores that rule, so tests and demos can measure true improvement, and
# `--reward-fn tiny_world.py:gold_reward` lets the RL scripts optimise it directly.
import json
import os
import random
import re
from dataclasses import dataclass

TOPICS = {
    "pets": ["cat", "dog", "puppy", "kitten", "leash", "vet"],
    "cars": ["car", "engine", "tire", "brakes", "garage", "mechanic"],
    "food": ["pizza", "pasta", "bread", "cheese", "soup", "salad"],
    "money": ["rent", "loan", "bank", "salary", "budget", "debt"],
    "school": ["exam", "teacher", "homework", "class", "grade", "essay"],
    "health": ["doctor", "fever", "sleep", "diet", "pain", "gym"],
}
NOUN_TOPIC = {noun: topic for topic, nouns in TOPICS.items() for noun in nouns}
FILLER = ["i", "my", "the", "a", "is", "and", "so", "but", "really", "today", "help", "about", "with", "what", "do"]
SUBREDDITS = {
    "pets": "pets",
    "cars": "cars",
    "food": "Cooking",
    "money": "personalfinance",
    "school": "college",
    "health": "Fitness",
}


def prompt_topic(prompt: str):
    """The topic of a prompt: the majority topic of the nouns in its TITLE line (TL;DR) or last Human turn (HH)."""
    title = re.search(r"TITLE:(.*)", prompt)
    text = title.group(1) if title else prompt.rsplit("Human:", 1)[-1].split("Assistant:")[0]
    topics = [NOUN_TOPIC[w] for w in re.findall(r"[a-z]+", text) if w in NOUN_TOPIC]
    return max(set(topics), key=topics.count) if topics else None


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Gold score in [-1, 1]: (distinct on-topic nouns - distinct off-topic nouns) / 3."""
    scores = []
    for prompt, response in zip(prompts, responses):
        topic = prompt_topic(prompt)
        nouns = {w for w in re.findall(r"[a-z]+", response) if w in NOUN_TOPIC}
        hits = sum(NOUN_TOPIC[w] == topic for w in nouns)
        scores.append(max(-1.0, min(1.0, (hits - (len(nouns) - hits)) / 3)))
    return scores


# The hard-exploration task (DR-PO's claim at CPU scale): the gold reward needs one exact 6-word answer, which a
# policy fine-tuned on random short answers almost never samples (about e^-17), but which the chosen responses of
# the offline comparisons contain. Written to {out}/password/ with its own word-level tokenizer and model.
PASSWORD_VOCAB = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
]
PASSWORD = "charlie hotel alpha mike papa delta"


def password_task(length: int = 6, vocab: int = 16):
    """(words, password) of a hard-exploration task: the default is PASSWORD over PASSWORD_VOCAB; other lengths and
    vocabulary sizes (up to 67 words: the code words, then the topic nouns and the filler words) draw a fixed password."""
    if (length, vocab) == (6, 16):
        return PASSWORD_VOCAB, PASSWORD
    words = list(dict.fromkeys(PASSWORD_VOCAB + list(NOUN_TOPIC) + FILLER))
    if not 1 <= vocab <= len(words):
        raise ValueError(f"--password-vocab must be 1 to {len(words)}, got {vocab}")
    words = words[:vocab]
    return words, " ".join(random.Random(1000 * length + vocab).choices(words, k=length))


def password_subreddit(length: int = 6, vocab: int = 16):
    """The prompt names its task: r/password for the default, r/password{length}x{vocab} for the others."""
    return "password" if (length, vocab) == (6, 16) else f"password{length}x{vocab}"


def password_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Sparse gold reward of the hard-exploration task: 1 for exactly the password the prompt's task asks, else 0."""
    scores = []
    for prompt, response in zip(prompts, responses):
        task = re.search(r"r/password(\d+)x(\d+)", prompt)
        password = password_task(*map(int, task.groups()))[1] if task else PASSWORD
        scores.append(float(response.split() == password.split()))
    return scores


def make_rows(n: int, rng: random.Random):
    """n examples, each a topic with a title, a post, a reference, a preferred and a rejected summary."""
    rows = []
    for i in range(n):
        topic = rng.choice(list(TOPICS))
        other = rng.choice([t for t in TOPICS if t != topic])
        on = rng.sample(TOPICS[topic], 3)
        off = rng.sample(TOPICS[other], 3)
        title = f"help with my {on[0]} and {on[1]}"
        sentences = [f"my {w} is {rng.choice(['bad', 'new', 'old', 'weird'])} ." for w in rng.sample(TOPICS[topic], 3)]
        sentences += [" ".join(rng.choices(FILLER, k=4)) + " ." for _ in range(rng.randint(1, 3))]
        rng.shuffle(sentences)
        rows.append(
            {
                "id": f"tiny-{i}",
                "topic": topic,
                "subreddit": SUBREDDITS[topic],
                "title": title,
                "post": "\n".join(sentences),
                # the SFT reference is decent but imperfect (2 on-topic nouns, 1 off-topic): RL has room to improve
                "reference": " " + " ".join(rng.sample(on[:2] + off[:1], 3)) + " .",
                "chosen": " " + " ".join(on) + " .",
                # off-topic nouns; half the time all from one other topic, so only the prompt tells it apart
                "rejected": " " + " ".join(off if rng.random() < 0.5 else rng.sample(on[:1] + off[:2], 3)) + " .",
            }
        )
    return rows


# The DPO task: SFT references that are half the time one bland answer. The SFT policy's greedy answer is then that
# bland answer (gold 0), though a specific one is often sampled; the comparisons prefer specific on-topic answers to
# the bland one or to off-topic ones, as labelers do. In the main world SFT's greedy answers are already on-topic, so
# DPO has no room to improve them there (BENCHMARKS.md). Written to {out}/bland/, with the main world's tokenizer.
BLAND = " so what do i do ."


def write_bland_world(out: str, args):
    rng = random.Random(args.seed + 1)  # its own generator: the main world and the password task are unchanged
    for split, n in (("train", args.n_train), ("validation", args.n_eval)):
        rows = make_rows(n, rng)
        sft = [tldr_sft(r | {"reference": BLAND if rng.random() < 0.5 else r["chosen"]}) for r in rows]
        comparisons = [tldr_comparison(r | {"rejected": BLAND if rng.random() < 0.5 else r["rejected"]}, rng) for r in rows]
        write_jsonl(f"{out}/tldr_sft/{split}.jsonl", sft)
        write_jsonl(f"{out}/tldr_comparisons/{split}.jsonl", comparisons)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def tldr_sft(row):
    return {k: row[k] for k in ("id", "subreddit", "title", "post")} | {"summary": row["reference"].strip()}


def tldr_comparison(row, rng):
    choice = rng.randint(0, 1)  # the chosen summary sits at a random position, as in the real data
    texts = [row["rejected"], row["rejected"]]
    texts[choice] = row["chosen"]
    return {
        "info": {k: row[k] for k in ("id", "post", "title", "subreddit")},
        "summaries": [{"text": t, "policy": "tiny"} for t in texts],
        "choice": choice,
    }


def hh_pair(row, rng):
    nouns = TOPICS[row["topic"]]
    context = ""
    if rng.random() < 0.5:  # half the transcripts have an earlier exchange on the same topic
        context = "\n\nHuman: hi\n\nAssistant: hello , what is your question ?"
    question = f"\n\nHuman: what do i do about my {rng.choice(nouns)} and {rng.choice(nouns)} ?\n\nAssistant:"
    return {"chosen": context + question + row["chosen"], "rejected": context + question + row["rejected"]}


def write_password_world(out: str, n: int, rng: random.Random, args):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, password = password_task(args.password_length, args.password_vocab)
    length = args.password_length
    info = {
        "id": "pw",
        "subreddit": password_subreddit(length, len(vocab)),
        "title": "what is the password ?",
        "post": "tell me the password",
    }
    sft, comparisons = [], []
    for i in range(n):
        answer = " ".join(rng.choices(vocab, k=rng.randint(1, length)))  # SFT: random answers, up to the password's length
        sft.append(info | {"id": f"pw-{i}", "summary": answer})
        other = " ".join(rng.choices(vocab, k=rng.randint(1, length)))
        choice = rng.randint(0, 1)
        texts = [" " + other, " " + other]
        texts[choice] = " " + password
        comparisons.append(
            {"info": info | {"id": f"pw-{i}"}, "summaries": [{"text": t, "policy": "tiny"} for t in texts], "choice": choice}
        )
    write_jsonl(f"{out}/tldr_sft/train.jsonl", sft)
    write_jsonl(f"{out}/tldr_comparisons/train.jsonl", comparisons)
    words = ["<|endoftext|>", "<|padding|>", "[UNK]", "SUBREDDIT:", "r/password", "TITLE:", "POST:", "TL;DR:"]
    words += [f"r/{info['subreddit']}"] + sorted({w for w in " ".join(info.values()).split()} - set(words)) + vocab
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<|endoftext|>", pad_token="<|padding|>")


@dataclass
class Args:
    out: str = "tiny"
    """folder to write the tiny world into"""
    seed: int = 0
    """seed of the data generator and of the model's random init"""
    n_train: int = 2000
    """training examples per dataset"""
    n_eval: int = 200
    """held-out examples per dataset (the `validation` / `test` split)"""
    tokenizer: str = "bpe"
    """`bpe`: a byte-level BPE of at most 512 tokens (508) trained on the world's text (the same everywhere); or a folder"""
    hidden_size: int = 64
    """width of the tiny GPT-NeoX"""
    num_layers: int = 2
    """depth of the tiny GPT-NeoX"""
    password: bool = True
    """also write the hard-exploration task to {out}/password/ (its own word-level tokenizer and model)"""
    password_length: int = 6
    """words in the hard-exploration task's password (the family in benchmarks/hard_exploration_family.py varies it)"""
    password_vocab: int = 16
    """words the password task's answers are drawn from (16 code words; up to 67)"""
    bland: bool = True
    """also write the DPO task to {out}/bland/ (SFT data whose most common answer is bland; uses {out}/base)"""


def build_tokenizer(args: Args, texts: list[str]):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if args.tokenizer != "bpe":
        if not os.path.isdir(args.tokenizer):
            raise SystemExit(f"--tokenizer {args.tokenizer}: not a folder (give `bpe` or a folder saved by save_pretrained)")
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<|endoftext|>", "<|padding|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        bpe.train_from_iterator(texts, trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    # Pythia's tokenizer.json alone leaves these unset; a dedicated pad token keeps the real EOS unmasked
    tokenizer.eos_token, tokenizer.pad_token = "<|endoftext|>", "<|padding|>"
    return tokenizer


def main(args: Args):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    rng = random.Random(args.seed)
    splits = {"train": make_rows(args.n_train, rng), "validation": make_rows(args.n_eval, rng)}
    for split, rows in splits.items():
        # the SFT dataset has train/validation/test; comparisons have train/validation; HH has train/test
        write_jsonl(f"{args.out}/tldr_sft/{split}.jsonl", [tldr_sft(r) for r in rows])
        write_jsonl(f"{args.out}/tldr_comparisons/{split}.jsonl", [tldr_comparison(r, rng) for r in rows])
        write_jsonl(f"{args.out}/hh/{'train' if split == 'train' else 'test'}.jsonl", [hh_pair(r, rng) for r in rows])
    texts = [
        f"SUBREDDIT: r/{r['subreddit']}\n\nTITLE: {r['title']}\n\nPOST: {r['post']}\n\nTL;DR: {r['chosen']} {r['rejected']}"
        for r in splits["train"]
    ] + [hh_pair(r, rng)["chosen"] for r in splits["train"]]
    tokenizer = build_tokenizer(args, texts)
    if args.bland:
        write_bland_world(f"{args.out}/bland", args)

    worlds = [(args.out, tokenizer)]
    if args.password:
        worlds.append((f"{args.out}/password", write_password_world(f"{args.out}/password", args.n_train, rng, args)))
    for out, tok in worlds:
        torch.manual_seed(args.seed)
        config = GPTNeoXConfig(
            vocab_size=len(tok),
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=4,
            intermediate_size=4 * args.hidden_size,
            max_position_embeddings=1024,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
        model = GPTNeoXForCausalLM(config)
        model.save_pretrained(f"{out}/base")
        tok.save_pretrained(f"{out}/base")
        print(f"wrote {out}/base/ (GPT-NeoX, {sum(p.numel() for p in model.parameters()):,} params, vocab {len(tok)})")
    print(
        f"tiny world in {args.out}/: tldr_sft/, tldr_comparisons/, hh/ ({args.n_train} train, {args.n_eval} eval rows)"
        + (", the DPO task in bland/" if args.bland else "")
        + (", the hard-exploration task in password/" if args.password else "")
    )


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
