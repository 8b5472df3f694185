"""
tools.py -- the Chain-of-Action format and the tool: the tags, the prompt, the parser, the reward, the search
backends and the one environment factory, make_environment.

The Chain-of-Action (CoA) format (AutoCoA, arXiv 2503.06580, Sec. 3). One trajectory, the default tags:

    Question: Where was the founder of Vexa born?
    <think> Vexa was founded by someone; I need to look it up.
    <begin_search> Vexa founder </end_search>                     <- action, written by the model
    <search_result> Vexa ... founded by Ada Brun ... </search_result>  <- observation, written by the environment
    Ada Brun was born in Lorn. </think> \\boxed{Lorn}                <- answer, after the reasoning

Everything between <think> and </think> is the model's; the observation is the only text it did not write.
The parser below turns any text (however broken) into (actions, answer, format_ok, reason); the reward is
1 for a correct boxed answer and 0 otherwise, and 0 whenever the format is broken (no </think>, an action
after </think>, no boxed answer).

Search tools, `tool(queries) -> [[passage, ...], ...]`: BM25Search (bm25s over a corpus JSONL, index cached on
disk) or server.HTTPSearch (a Search-R1 retrieval server). What rollout.py sends queries to, `environment(queries,
contexts) -> observations`, comes from make_environment, by env.env: real -> SearchEnv (a tool, its calls counted
and logged), worldmodel -> WorldModelEnv (an LM writes the observation), policy -> None (the policy writes it).

Not here: the config machinery (config.py), model loading (plumbing.py), generation (rollout.py), training the
world model (worldmodel.py) or the policy (sft.py, rl.py).
"""
import json
import os
import re
import shutil
import string
import sys
from collections import Counter
from dataclasses import dataclass, field

from config import ConfigError, RunError, read_corpus

# -----------------------------------------------------------------------------
# The settings of the CoA format and of the environment (the config's env section)

@dataclass
class EnvConfig:
    # the CoA format (the paper's tags); every stage reads them from here
    think_open: str = "<think>"  # opens the reasoning
    think_close: str = "</think>"  # closes it; the answer comes after
    action_open: str = "<begin_search>"  # opens an action (a search query), written by the model
    action_close: str = "</end_search>"  # closes it: generation pauses and the environment answers
    obs_open: str = "<search_result>"  # opens an observation, written by the environment
    obs_close: str = "</search_result>"  # closes it
    answer_open: str = "\\boxed{"  # the final answer's opener (the answer runs to its closing brace)
    system_prompt: str = (  # what a model with a chat template is told (the tiny model has none: never sees it)
        "Answer the question. Think inside <think> </think>. To search, write <begin_search> query </end_search>; "
        "results come back inside <search_result> </search_result>. After </think>, give the final answer as "
        "\\boxed{answer}.")
    # the environment
    env: str = "real"  # real | policy (the policy writes its own observation) | worldmodel
    sim_greedy: bool = False  # env=policy: the policy writes its own observation greedily, not sampled (the
                              # environment's tokens are never trained on: sampling them only adds noise to what
                              # the simulator knows)
    tool: str = "bm25"  # bm25 | http
    corpus: str = ""  # corpus JSONL for bm25; empty = <run.data_dir>/corpus.jsonl
    url: str = "http://127.0.0.1:8000/retrieve"  # retrieval server for tool=http
    topk: int = 2  # passages per query
    obs_max_tokens: int = 150  # token budget of one observation
    max_query_chars: int = 300  # longer queries are cut before they reach the tool
    timeout_s: float = 10.0  # deadline of one HTTP tool call: connect, send and the whole reply, retries included
    retries: int = 2  # HTTP retries after the first try, with exponential backoff, within timeout_s
    on_error: str = "observe"  # observe: the model sees "search failed: ..."; raise: stop the run
    max_actions: int = 4  # at most this many searches, then the answer is forced (paper's Algorithm 1)
    limit_observation: str = ""  # a search past max_actions is not run and gets this text as its observation, and
                                 # the model goes on (the paper's code: "Reach the limit of search times."); empty =
                                 # the answer is forced
    number_results: bool = False  # observations number their passages "result 1: ...\nresult 2: ..." (the paper's)
    max_new_tokens: int = 256  # per trajectory, observations included
    truncation_warn: float = 0.2  # an RL step or an eval whose share of trajectories stopped at max_new_tokens is
                                  # above this says so in one line (their answers were cut, not wrong)
    static_decode: bool = False  # rollout.py: preallocated cache, fixed-shape decode step (a CUDA graph on cuda)
    worldmodel: str = ""  # path of the world-model LM, for env=worldmodel

    RANGES = {"topk": "[1, inf)", "obs_max_tokens": "[1, inf)", "max_query_chars": "[1, inf)",
              "timeout_s": "(0, inf)", "retries": "[0, 100]", "max_actions": "[0, inf)", "max_new_tokens": "[1, inf)",
              "truncation_warn": "[0, 1]"}
    CHOICES = {"env": ("real", "policy", "worldmodel"), "tool": ("bm25", "http"), "on_error": ("observe", "raise")}


# -----------------------------------------------------------------------------
# The CoA format: prompts and the parser

def build_prompt(tokenizer, question, env):
    """The text a trajectory starts from; it always ends with the think opener.

    With a chat template (instruct models) the system prompt explains the tags; a model trained from scratch
    (the tiny world) has no template and sees `Question: ...` alone.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": env.system_prompt}, {"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text if text.rstrip().endswith(env.think_open) else text + env.think_open
    return f"Question: {question}\n{env.think_open}"


@dataclass
class Parsed:
    actions: list = field(default_factory=list)  # queries, in order
    answer: str | None = None  # content of the last \boxed{} after </think>
    format_ok: bool = False
    reason: str = ""  # why the format is broken ("" when ok)


def extract_boxed(text, opener="\\boxed{"):
    """Content of the last balanced \\boxed{...} in text, or None. Nested braces are kept; an unclosed opener
    is passed over for an earlier one. The opener ends with "{".

    Linear time: one pass pairs every brace with a stack, then each opener looks its brace up. (Scanning
    forward from each opener in turn is quadratic: 4,000 unclosed openers took 15 s, and a policy that babbles
    must not stall scoring.)
    """
    close_of, stack = {}, []  # position of a "{" -> position of its "}"
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close_of[stack.pop()] = m.start()
    for m in reversed(list(re.finditer(re.escape(opener), text))):
        brace = m.end() - 1
        if brace in close_of:
            return text[brace + 1:close_of[brace]].strip()
    return None


def parse(text, env):
    """Parse a completion (the text after the prompt) into a Parsed; never raises.

    Observations are cut out first, so nothing inside tool output counts as an action or an answer.
    """
    try:
        return _parse(text, env)
    except Exception as e:  # a parser bug must not kill a training run; report it as a broken format
        return Parsed(reason=f"parser error: {type(e).__name__}")


def _parse(text, env):
    # drop the observations (a missing obs_close swallows the rest, as the environment never closed it)
    body = re.sub(re.escape(env.obs_open) + ".*?(" + re.escape(env.obs_close) + "|$)", " ", text, flags=re.S)
    if body.lstrip().startswith(env.think_open):
        body = body.lstrip()[len(env.think_open):]
    think, closed, after = body.partition(env.think_close)
    actions = find_actions(think, env)
    out = Parsed(actions=actions, answer=extract_boxed(after, env.answer_open) if closed else None)
    if not closed:
        out.reason = "no think_close"
    elif env.think_close in after:
        out.reason = "repeated think_close"
    elif env.think_open in think or env.think_open in after:
        out.reason = "nested think_open"
    elif env.action_open in after or env.action_close in after:
        out.reason = "action after think_close"
    elif think.count(env.action_open) != len(actions) or think.count(env.action_close) != len(actions):
        out.reason = "unbalanced action tags"
    elif out.answer is None:
        out.reason = "no answer"
    elif any(not q for q in actions):
        out.reason = "empty query"
    out.format_ok = out.reason == ""
    return out


def find_actions(think, env):
    """Each action_open ... action_close query in order, as a lazy regex would find them, in linear time (a lazy
    regex rescans the rest of the text from every unclosed opener)."""
    actions, i = [], 0
    while (start := think.find(env.action_open, i)) != -1:
        end = think.find(env.action_close, start + len(env.action_open))
        if end == -1:
            break  # no close after this opener: none after any later one either
        actions.append(think[start + len(env.action_open):end].strip())
        i = end + len(env.action_close)
    return actions


def action_text(query, env):
    """An action as a trajectory holds it, with the space before it: " <begin_search> query </end_search>"."""
    return f" {env.action_open} {query} {env.action_close}"


def observation_text(body, env):
    """An observation as the environment writes it, right after the action: "<search_result> body </search_result>"."""
    return f"{env.obs_open} {body} {env.obs_close}"


def failed_observation(cause, env):
    """The observation of a failed search (a tool's error, a broken environment): the model reads why, and goes on."""
    return observation_text(f"search failed: {cause}", env)


def observation_body(text, env, every_tag=False):
    """The text inside an observation's tags (no closing tag: up to the end). every_tag: every tag taken out, wherever
    it stands, as eval's ReAct loop reads the tool's observations (the same text where the body holds no tag)."""
    if every_tag:
        return text.replace(env.obs_open, "").replace(env.obs_close, "").strip()
    text = text.split(env.obs_open, 1)[1] if env.obs_open in text else text
    return text.split(env.obs_close, 1)[0].strip()


def answer_text(env, answer=None):
    """The end of the reasoning and the answer, " </think> \\boxed{answer}"; None: the opener (a forced answer)."""
    opener = f" {env.think_close} {env.answer_open}"
    return opener if answer is None else f"{opener}{answer}}}"


def loss_mask(who, n, observation_weight=0):
    """The loss weights of n tokens `who` wrote (1 = trained on, 0 = masked): the one definition sft.py, rollout.py
    and eval.py use. "env" is all the model did not write (observations, self-written ones included: no policy
    log-prob is owed for them, and a model trained on them learns to write its own evidence; forced text), weighted
    observation_weight: 0 everywhere but SFT-3 (sft.obs_weight; 1 = the paper's no mask)."""
    return [observation_weight if who == "env" else 1] * n


# -----------------------------------------------------------------------------
# Rewards and metrics: SQuAD normalisation, EM, F1, the paper's lenient match, several gold answers.

PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(s):
    s = s.lower().translate(PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred, golds):
    """1.0 if the normalised prediction equals a normalised gold answer. An empty prediction never matches:
    normalisation empties \\boxed{} and a gold answer such as "A" alike."""
    pred = normalize_answer(pred)
    return float(bool(pred) and any(pred == normalize_answer(g) for g in golds))


def token_f1(pred, gold, both_empty=0.0):
    """SQuAD token F1 of two texts after normalize_answer. both_empty: the score when neither has a word left (an
    answer: 0, as exact_match never matches an empty answer; worldmodel.py's observation bodies: two empty agree, 1)."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p and not g:
        return both_empty
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred, golds):
    return max((token_f1(pred, g) for g in golds), default=0.0)


# AutoCoA's reward reads answers more leniently than SQuAD: number words as digits ("two" is "2"), filler words
# dropped, typographic quotes and CJK brackets dropped (string.punctuation has only ASCII)
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine".split())}
FILLERS = {"well", "so", "basically", "actually", "literally", "simply", "just", "um", "uh"}
QUOTES = str.maketrans("", "", "\u201c\u201d\u2018\u2019\u300c\u300d\u300e\u300f")


def lenient_words(s):
    """The words lenient_match compares: SQuAD normalisation, then number words as digits, no filler words."""
    words = (NUMBER_WORDS.get(w, w) for w in normalize_answer(s.translate(QUOTES)).split())
    return [w for w in words if w not in FILLERS]


def lenient_match(pred, golds, share=0.7):
    """The paper's correctness: EM, or at least `share` of a gold answer's distinct words appear in the prediction,
    both read by lenient_words. (AutoCoA's code also scores 0 when one answer is a substring of the other, before
    the overlap test; the paper states EM or the overlap, which is what this is.)"""
    if exact_match(pred, golds):
        return 1.0
    p = set(lenient_words(pred))
    for g in golds:
        g = set(lenient_words(g))
        if g and p and len(g & p) >= share * len(g):
            return 1.0
    return 0.0


REWARDS = {"em": exact_match, "f1": f1_score, "lenient": lenient_match}  # rl.reward: how an answer is scored


def reward(text, golds, env, kind="em"):
    """1 for a correct answer in a well-formed trajectory, else 0: correct by REWARDS[kind] (em: exact match;
    lenient: the paper's EM or 70% of the gold words; f1: the answer's F1, a number in [0, 1])."""
    if kind not in REWARDS:
        raise ConfigError(f"config: rl.reward must be {', '.join(REWARDS)}, got {kind!r}")
    parsed = parse(text, env)
    if not parsed.format_ok:
        return 0.0
    return REWARDS[kind](parsed.answer, golds)


# -----------------------------------------------------------------------------
# Search tools: queries -> top-k passages each

class ToolError(RunError):
    """A search that failed; `cause` is the short reason (connection refused, timeout, HTTP 500, bad JSON)."""

    def __init__(self, message, cause=""):
        super().__init__(message)
        self.cause = cause or message


class FailureLimit(ToolError):
    """More of a run's tool calls failed than it allows (SearchEnv.limit_failures): the run stops, whatever
    env.on_error says (rollout.py lets it through)."""


def import_bm25s():
    """bm25s, imported with `jax` hidden. bm25s.selection imports jax when it can and runs a top-k on it at import
    time (its fast backend); on a GPU box JAX then preallocates 75% of the card's memory, which training needs.
    With jax hidden, bm25s takes its numpy backend, which retrieve(backend_selection="numpy") also asks for."""
    if "bm25s" in sys.modules:
        return sys.modules["bm25s"]
    hidden = {name: sys.modules.get(name) for name in ("jax", "jax.lax")}
    sys.modules.update(dict.fromkeys(hidden))  # None in sys.modules: `import jax` raises ImportError
    try:
        import bm25s
    finally:
        for name, module in hidden.items():  # a user's own jax import still works afterwards
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module
    return bm25s


def index_is(index_dir, stamp):
    """Whether index_dir holds the index of the corpus whose size and mtime make stamp."""
    stamp_file = os.path.join(index_dir, "stamp.txt")
    return os.path.exists(stamp_file) and open(stamp_file).read() == stamp


class BM25Search:
    """BM25 (bm25s, numpy backend, never JAX) over a corpus JSONL; the index is built once and cached next to the
    corpus."""

    def __init__(self, corpus_path, index_dir=None, mmap=False):
        bm25s = import_bm25s()
        self.docs = read_corpus(corpus_path)
        index_dir = index_dir or corpus_path + ".bm25"
        stamp = f"{os.path.getsize(corpus_path)}-{os.path.getmtime(corpus_path)}"
        if index_is(index_dir, stamp):
            self.index = bm25s.BM25.load(index_dir, mmap=mmap)  # mmap: the OS pages a wiki-sized index in
        else:
            tokens = bm25s.tokenize([d["contents"] for d in self.docs], stopwords="en", show_progress=False)
            if not tokens.vocab:  # bm25s itself fails on it with "max() arg is an empty sequence"
                raise ConfigError(f"{corpus_path}: no corpus row has a word to search (every contents is empty or "
                                  f"stopwords)")
            self.index = bm25s.BM25()
            self.index.index(tokens, show_progress=False)
            self.save(index_dir, stamp)

    def save(self, index_dir, stamp):
        """Put the index in place atomically, so a killed build never leaves a half index. Each build writes its own
        temporary folder: torchrun's ranks build the same missing index at once, and with one shared folder one
        rank's rename pulled the files from under another's save. The first to finish puts its index in place; the
        others drop theirs (the same corpus, the same index) and keep theirs in memory."""
        tmp = f"{index_dir}.tmp-{os.getpid()}-{id(self)}"
        self.index.save(tmp)
        with open(os.path.join(tmp, "stamp.txt"), "w") as f:
            f.write(stamp)
        if os.path.exists(index_dir) and not index_is(index_dir, stamp):  # an older corpus's index
            shutil.rmtree(index_dir, ignore_errors=True)  # another rank may be removing it too
        try:
            os.replace(tmp, index_dir)
        except OSError:  # another build's index is there already
            shutil.rmtree(tmp)

    def search(self, queries, k=2):
        """(document indices, scores) per query, best first, at most k; numpy top-k, never jax. Documents that share
        no term with the query (score 0: bm25s fills its top k with them) are left out, so a query that matches
        nothing gets no passages ("no results"), not k arbitrary documents."""
        bm25s = import_bm25s()
        tokens = bm25s.tokenize([q or " " for q in queries], stopwords="en", show_progress=False)
        idx, scores = self.index.retrieve(tokens, k=min(k, len(self.docs)), show_progress=False, n_threads=1,
                                          backend_selection="numpy")
        hits = [[(i, s) for i, s in zip(row, row_scores) if s > 0] for row, row_scores in zip(idx.tolist(),
                                                                                            scores.tolist())]
        return [[i for i, _ in row] for row in hits], [[s for _, s in row] for row in hits]

    def __call__(self, queries, k=2):
        return [[self.docs[i]["contents"] for i in row] for row in self.search(queries, k)[0]]


def make_tool(env, run=None):
    if env.tool == "bm25":
        return BM25Search(env.corpus or os.path.join(run.data_dir if run else "data/tiny", "corpus.jsonl"))
    if env.tool == "http":
        from server import HTTPSearch  # server.py imports this module (BM25Search for its bm25 retriever)
        return HTTPSearch(env.url, env.timeout_s, env.retries)
    raise ConfigError(f"config: env.tool must be bm25 or http, got {env.tool!r}")


def format_observation(passages, tokenizer, env, numbered=None):
    """Passages -> one observation string (tags included) whose body fits env.obs_max_tokens tokens.

    numbered (None = env.number_results): "result 1: ...\nresult 2: ..." as the paper's observations; False for a
    body a world model wrote, already in the shape it learnt from the tool's observations."""
    numbered = env.number_results if numbered is None else numbered
    passages = [f"result {i}: {p}" for i, p in enumerate(passages, 1)] if numbered else passages
    body = "\n".join(passages) if passages else "no results"
    ids = tokenizer.encode(" " + body, add_special_tokens=False)
    if len(ids) > env.obs_max_tokens:
        body = tokenizer.decode(ids[:env.obs_max_tokens]).strip()
    return observation_text(body.strip(), env)


def split_context(context, tokenizer, env):
    """(question, history) of a trajectory's text so far (prompt + completion, as rollout.py passes it).

    The prompt is matched against build_prompt's own shape, so this works with and without a chat template;
    text of another shape comes back as ("", context): all of it history.
    """
    marker = "QUESTIONMARKER"
    prefix, _, suffix = build_prompt(tokenizer, marker, env).partition(marker)
    if context.startswith(prefix) and suffix in context[len(prefix):]:
        question, _, history = context[len(prefix):].partition(suffix)
        return question, history
    return "", context


class SearchEnv:
    """The real environment: a batch of queries -> a batch of observation strings; counts real calls and failures.

    `contexts` (the text of each trajectory so far) does not change the result; with `log_path` every real call
    is appended to a JSONL file as {"question", "history", "query", "observation"}: the world model's training
    data (worldmodel.py), collected for free during synthesis, RL with the real tool, and eval. A failed call
    is logged too, with {"error": cause}, and its observation says "search failed: cause"; `failures` counts
    them and `last_error` keeps the tool's whole message (with the server's URL). After limit_failures(share, ...)
    the call that takes the failed share of the calls since then past `share` raises FailureLimit: a retriever that
    is down stops a run at once, not after a whole rollout of "search failed" observations.
    """
    simulated = False

    def __init__(self, tool, tokenizer, env, log_path=None):
        import threading
        self.tool, self.tokenizer, self.env, self.log_path = tool, tokenizer, env, log_path
        self.lock = threading.Lock()  # synthesis calls from a pool of threads: the counters and the log are shared
        self.calls = 0  # real tool calls spent, one per query
        self.failures = 0  # calls whose search failed (after the tool's own retries)
        self.last_error = None  # the message of the latest failure
        self.limit = None  # (share, config key, where, calls, failures) of limit_failures

    def limit_failures(self, share, key, where=""):
        """From now on, stop (FailureLimit) when more than `share` of the calls since now failed; the message
        starts with `where` and names the config `key` that sets the share."""
        self.limit = (share, key, where, self.calls, self.failures)

    def __call__(self, queries, contexts=None):
        queries = [q.strip()[:self.env.max_query_chars] for q in queries]
        with self.lock:
            self.calls += len(queries)
        try:
            results = self.tool(queries, k=self.env.topk)
        except Exception as e:
            cause = getattr(e, "cause", "") or type(e).__name__
            if self.env.on_error == "raise":
                raise ToolError(str(e), cause) from e
            with self.lock:
                self.failures += len(queries)
                self.last_error = str(e) or cause
            observations = [failed_observation(cause, self.env)] * len(queries)
            if self.log_path:
                self.log(queries, contexts or [""] * len(queries), observations, error=cause)
            if self.limit:
                share, key, where, calls, failures = self.limit
                calls, failed = self.calls - calls, self.failures - failures
                if failed > share * calls:
                    raise FailureLimit(f"{where}{failed} of {calls} real tool calls failed, more than {key}={share:g}:"
                                       f" {self.last_error}", cause)
            return observations
        observations = [format_observation(p, self.tokenizer, self.env) for p in results]
        if self.log_path:
            self.log(queries, contexts or [""] * len(queries), observations)
        return observations

    def log(self, queries, contexts, observations, error=None):
        """Append one row per call; one write per batch, so concurrent ranks do not interleave rows."""
        rows = []
        for query, context, obs in zip(queries, contexts, observations):
            question, history = split_context(context, self.tokenizer, self.env)
            row = {"question": question, "history": history, "query": query, "observation": obs}
            rows.append(json.dumps({**row, "error": error} if error else row, ensure_ascii=False) + "\n")
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with self.lock, open(self.log_path, "a") as f:
            f.write("".join(rows))


# -----------------------------------------------------------------------------
# The world model as an environment: an LM (worldmodel.py trains it) writes the observation of each query

def interaction_history(history, env):
    """The earlier (action, observation) pairs of a trajectory's text, canonically spaced; thoughts dropped.

    A trailing action without its observation (the call being answered) is not part of the history.
    """
    pattern = (re.escape(env.action_open) + r"(.*?)" + re.escape(env.action_close) + r"\s*(" +
               re.escape(env.obs_open) + r".*?" + re.escape(env.obs_close) + ")")
    return "".join(f"{action_text(q.strip(), env)}{obs}" for q, obs in re.findall(pattern, history, flags=re.S))


def wm_prompt_ids(tokenizer, question, history, query, env, history_max_tokens, answers=None):
    """Ids of `Question: q\\n<history> <begin_search> query </end_search>`; the history is cut from the left.
    With answers (a gold-shown world model) the question line is followed by `Answer: a1 | a2\\n`."""
    shown = f"Answer: {' | '.join(answers)}\n" if answers is not None else ""
    head = tokenizer.encode(f"Question: {question}\n{shown}", add_special_tokens=False)
    past = tokenizer.encode(interaction_history(history, env), add_special_tokens=False)
    past = past[-history_max_tokens:] if history_max_tokens > 0 else []
    return head + past + tokenizer.encode(action_text(query, env), add_special_tokens=False)


def shown_answers(golds, question):
    """The gold answers a gold-shown world model's prompt holds (None: golds is None, a plain world model). A
    question without any is an error: a prompt without them is one the model was never trained on."""
    if golds is None:
        return None
    if not golds.get(question):
        raise ConfigError(f"worldmodel: no gold answer known for the question {question!r}, and this world model is "
                          f"shown one (worldmodel.gold=true; served, it knows run.data_dir/train.jsonl's only)")
    return golds[question]


class WorldModelEnv:
    """A world-model LM served like tools.SearchEnv: `(queries, contexts) -> observations`, tags included.

    contexts are the trajectories' text so far (prompt + completion); the question and earlier calls are read
    from them. The observation body is cut to env.obs_max_tokens tokens of the *policy's* tokenizer, the same
    budget as the real tool's observations. golds (question -> answers): a gold-shown world model (ZeroSearch),
    its prompts hold the answers of the trajectory's question.
    """
    simulated = True

    def __init__(self, model, wm_tokenizer, env, tokenizer=None, history_max_tokens=256, batch_size=32, golds=None):
        self.model, self.wm_tokenizer, self.env = model.eval(), wm_tokenizer, env
        self.tokenizer = tokenizer or wm_tokenizer  # the policy's: contexts and the token budget are in its terms
        self.history_max_tokens, self.batch_size, self.golds = history_max_tokens, batch_size, golds
        self.calls = 0  # simulated calls, one per query

    @classmethod
    def from_path(cls, path, env, tokenizer, run, **kwargs):
        """The folder alone says whether it was trained with gold answers (worldmodel.gold, in its config.json);
        then the golds come from run.data_dir's training questions only: RL-1 asks those, and an eval run on dev or
        test questions with this environment stops at its first call instead of showing the simulator the answers."""
        from data import golds_by_question  # data.py imports this module
        from plumbing import check_worldmodel_folder, load_model  # plumbing (torch) only where a model is loaded
        check_worldmodel_folder(path)
        model, wm_tokenizer = load_model(path, run)
        gold_shown = getattr(model.config, "worldmodel_gold", False)
        golds = golds_by_question(run.data_dir, ("train",)) if gold_shown else None
        return cls(model, wm_tokenizer, env, tokenizer, golds=golds, **kwargs)

    def prompt(self, question, history, query):
        return wm_prompt_ids(self.wm_tokenizer, question, history, query, self.env, self.history_max_tokens,
                             shown_answers(self.golds, question))

    def __call__(self, queries, contexts=None):
        queries = [q.strip()[:self.env.max_query_chars] for q in queries]
        contexts = contexts or [""] * len(queries)
        self.calls += len(queries)
        prompts = [self.prompt(*split_context(context, self.tokenizer, self.env), query)
                   for query, context in zip(queries, contexts)]
        return [self.finish(text) for text in self.write(prompts)]

    def write(self, prompts):
        """Raw generated texts, in batches."""
        from rollout import generate  # rollout.py imports this module: read at the first simulated call
        texts = []
        for i in range(0, len(prompts), self.batch_size):
            outs, _ = generate(self.model, self.wm_tokenizer, prompts[i:i + self.batch_size],
                               self.env.obs_max_tokens + 8, [self.env.obs_close])
            texts += [self.wm_tokenizer.decode(o, skip_special_tokens=False) for o in outs]
        return texts

    def finish(self, text):
        """A well-formed observation within the real tool's token budget, whatever the model wrote."""
        text = text.replace(self.wm_tokenizer.eos_token, "")
        return format_observation([observation_body(text, self.env)], self.tokenizer, self.env, numbered=False)


def make_environment(env, run, tokenizer, log_path=None):
    """The environment env.env names: real -> SearchEnv (its calls appended to log_path, when given),
    worldmodel -> WorldModelEnv(env.worldmodel), policy -> None (the policy writes its own observations in
    rollout.py)."""
    if env.env == "real":
        return SearchEnv(make_tool(env, run), tokenizer, env, log_path=log_path)
    if env.env == "worldmodel":
        if not env.worldmodel:
            raise ConfigError("config: env.env=worldmodel needs env.worldmodel (a world-model folder)")
        return WorldModelEnv.from_path(env.worldmodel, env, tokenizer, run)
    if env.env == "policy":
        return None
    raise ConfigError(f"config: env.env must be real, policy or worldmodel, got {env.env!r}")


if __name__ == "__main__":  # a library, imported by every stage: say what to run instead
    print("tools.py is a library (the CoA format, the search tools, make_environment), not a script: the retrieval "
          "server is python server.py --help; the pipeline, python demo.py --help")
    sys.exit(0 if sys.argv[1:] in ([], ["-h"], ["--help"]) else 2)
