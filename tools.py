"""
tools.py -- the small module every stage shares: config, the CoA format, the parser, the search tools,
rewards and metrics, model loading.

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

Search tools share one batched interface, `tool(queries) -> [[passage, ...], ...]`:
  - BM25Search: bm25s over a local corpus JSONL ({"id", "contents"}, title on the first line), index cached on disk;
  - HTTPSearch: a Search-R1 / FlashRAG retrieval server (POST /retrieve), one deadline per call, retries and backoff.
SearchEnv wraps a tool into the environment rollout.py talks to: queries in, observation strings out, calls counted.

The retrieval server (last section) serves a corpus in that same wire format, BM25 or dense (e5 + faiss):
    python tools.py serve --corpus data/wiki/corpus.jsonl --port 8000     # then env.tool=http everywhere
    python tools.py serve --corpus ... --workers 32 --timeout_s 30         # worker threads, per-request deadline
    python tools.py serve --retriever e5 --corpus wiki-18.jsonl --index e5_Flat.index --device cuda   # the paper's

Not here: the world model environment (worldmodel.py), generation (rollout.py), training (sft.py, rl.py).
"""
import contextlib
import dataclasses
import difflib
import functools
import http.client
import inspect
import io
import json
import os
import re
import shutil
import signal
import string
import sys
import textwrap
import threading
import time
import tokenize
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field

import yaml

# -----------------------------------------------------------------------------
# Config: one YAML file, one section per stage; each section is a dataclass owned by the file that uses it.
# Precedence: dataclass defaults < YAML < command line `section.key=value` (or `key=value` for the script's own
# section). Unknown sections, unknown keys and wrong types raise with the name in the message.

SECTIONS = ("run", "env", "world", "model", "synth", "sft", "worldmodel", "rl", "eval", "chat")


class ConfigError(ValueError):
    """A usage or config error: the script's fault is the user's input, so it ends with one line, not a traceback."""


class RunError(RuntimeError):
    """A run stopped by what it depends on, not by a bug: the retrieval server failing, a full disk. One line."""


def write_failure(error):
    """The OS's own words for a failed write ("no space left on device", "permission denied"), from an OSError
    anywhere in the exception's chain (torch.save reports one as "unexpected pos", with the OSError as its context)
    or from a writer's message ("... (os error 28)": safetensors); None when the error is not the OS's."""
    e = error
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno).lower()
        e = e.__cause__ or e.__context__
    found = re.search(r"\(os error (\d+)\)", str(error))
    return os.strerror(int(found.group(1))).lower() if found else None


@contextlib.contextmanager
def partial_write(tmp, what):
    """Around writing `tmp` (a file or folder renamed into place afterwards): when the block fails, tmp is removed
    (a full disk stays full otherwise), and a failed write becomes a one-line RunError naming `what` and the cause."""
    try:
        yield
    except Exception as e:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        cause = write_failure(e)
        if cause is None:
            raise
        raise RunError(f"cannot write {what}: {cause}") from e


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that both unwind a run the same way (tools.cli)."""


def cli(main, argv=None):
    """Run an entry point's main(argv): a ConfigError prints its one line to stderr and exits with status 2
    (the convention of argparse and of Unix tools for bad usage), a RunError its one line and status 1; any other
    exception keeps its traceback. SIGINT (Ctrl-C) and SIGTERM end it with one line, saying for a trainer which
    checkpoint is newest and which command resumes from it, and status 130 / 143 (128 + the signal, as a shell
    reports a killed command). Whatever ends it, the locks of its runs are released (plumbing.stop_runs)."""
    def stop(signum, frame):
        raise Stopped()
    if not sys.stderr.isatty():  # a log file: transformers' own bars (loading, saving weights) are redraws too
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set a signal handler
    before = signal.signal(signal.SIGTERM, stop) if main_thread else None
    name = os.path.basename(sys.argv[0])
    try:
        return main(argv)
    except (ConfigError, RunError) as e:
        stop_runs()
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except KeyboardInterrupt as e:
        signal_name = "SIGTERM" if isinstance(e, Stopped) else "SIGINT"
        note = stop_runs(signal_name)
        if int(os.environ.get("RANK", 0)) == 0:
            end_bar = "\n" if sys.stderr.isatty() else ""  # a terminal's progress bar is a line left open
            print(f"{end_bar}{name}: stopped by {signal_name}" + (f"; {note}" if note else ""), file=sys.stderr,
                  flush=True)
        sys.exit(143 if isinstance(e, Stopped) else 130)
    finally:
        stop_runs()  # a traceback too: the lock file goes with the run
        if main_thread:
            signal.signal(signal.SIGTERM, before)


def stop_runs(signal_name=None):
    """plumbing.stop_runs where plumbing is loaded (plumbing imports tools: a script that never imported it holds
    no lock)."""
    plumbing = sys.modules.get("plumbing")
    return plumbing.stop_runs(signal_name) if plumbing else ""


def read_key_values(cls, argv, who):
    """key=value arguments over a dataclass of defaults (the benches' small configs) -> a dict, each value parsed
    to its field's type; --help prints the keys (help_text) and exits; an unknown key or a bad value is a
    ConfigError."""
    argv = list(argv)
    if "--help" in argv or "-h" in argv:
        show_help(help_text({"": cls}, doc=getattr(sys.modules.get("__main__"), "__doc__", None)))
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {}
    for item in argv:
        key, _, value = item.partition("=")
        if key not in types:
            raise ConfigError(f"{who}: unknown argument {key!r} (known: {', '.join(types)})")
        values[key] = parse_value(value, types[key], key)
    return dataclasses.asdict(cls(**values))


# --help: a script's flags and every key of its config sections with type, default and meaning. The meaning is
# the field's trailing `# comment` in its dataclass (a comment line indented under the field continues it; one
# at the field's indent is a heading), read from the source, so the help cannot drift from the code
# (tests/test_tools.py checks that every field of every section has one).

@functools.lru_cache(maxsize=None)
def field_help(cls):
    """{field name: its comment} of a config dataclass, from its source."""
    source = textwrap.dedent(inspect.getsource(cls))
    names = {f.name for f in dataclasses.fields(cls)}
    fields_at = {}  # source row -> (field, indent)
    for row, line in enumerate(source.splitlines(), 1):
        m = re.match(r"( *)(\w+) *:", line)
        if m and m.group(2) in names:
            fields_at[row] = (m.group(2), len(m.group(1)))
    out, last = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        (row, col), text, alone = tok.start, tok.string.lstrip("#").strip(), not tok.line[:tok.start[1]].strip()
        if row in fields_at:
            last = fields_at[row]
            out[last[0]] = text
        elif alone and last and col > last[1]:
            out[last[0]] += " " + text
        elif alone:
            last = None
    return out


def show_help(text):
    """Print a --help and exit 0, also when the reader stops early (`--help | head`: a broken pipe, no traceback)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would raise again
    raise SystemExit(0)


def help_text(sections, own=None, flags=None, doc=None, prog=None):
    """The --help of a script: usage, the first paragraph of its docstring, its flags, then per section every key
    as `section.key  type = default  meaning`."""
    prog = prog or os.path.relpath(sys.argv[0])
    flags = flags if isinstance(flags, dict) else dict.fromkeys(flags or (), "")
    usage = " ".join(["usage: python", prog, "[--config FILE]" if any(sections) else "",
                      *(f"[--{f}]" for f in flags), "[key=value ...]"])
    lines = [" ".join(usage.split())]
    if doc:
        lines += ["", doc.strip().split("\n\n")[0]]
    described = {"--config FILE": "YAML, one mapping per section: its values replace the defaults below, and "
                                  "key=value arguments replace both"} if any(sections) else {}
    described.update({f"--{name}": meaning for name, meaning in flags.items()})
    described["-h, --help"] = "print this help and exit"
    lines += ["", "flags:"] + [textwrap.fill(meaning, 118, initial_indent=f"  {name:<16}", subsequent_indent=" " * 18)
                               for name, meaning in described.items()]
    for name, cls in sections.items():
        if name:
            lines += ["", f"{name}:" + (f" (a bare key=value means {name}.key)" if name == own else "")]
        else:
            lines += ["", "keys:"]
        meanings = field_help(cls)
        for f in dataclasses.fields(cls):
            default = repr(f.default) if len(repr(f.default)) < 60 else repr(f.default)[:50] + "...'"
            key = f"  {name + '.' if name else ''}{f.name}  {f.type.__name__} = {default}"
            text = meanings.get(f.name, "")
            if len(key) > 44:
                lines += [key, textwrap.fill(text, 118, initial_indent=" " * 46, subsequent_indent=" " * 46)]
            else:
                lines.append(textwrap.fill(text, 118, initial_indent=f"{key:<46}", subsequent_indent=" " * 46))
    if doc:
        lines += ["", f"The docstring at the top of {prog} explains what it does and how."]
    return "\n".join(lines)


@dataclass
class RunConfig:
    name: str = "tiny"  # every artifact of this pipeline goes under <runs_dir>/<name>/
    runs_dir: str = "runs"  # where run folders live
    seed: int = 0  # the seed of the world, the initialisation, the data order and sampling
    data_dir: str = "data/tiny"  # corpus.jsonl, train/dev/test.jsonl (data.py writes them for the tiny world)
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # auto = bfloat16 on cuda, float32 on cpu
    log: str = "none"  # none | wandb | tensorboard: also send the metrics JSONL rows there (plumbing.start_logging)

    CHOICES = {"device": ("auto", "cpu", "cuda", "cuda:N"), "dtype": ("auto", "float32", "bfloat16", "float16"),
               "log": ("none", "wandb", "tensorboard")}

    @property
    def dir(self):
        return os.path.join(self.runs_dir, self.name)


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


def parse_value(text, typ, name):
    """Parse a command-line string into the dataclass field's type."""
    try:
        value = yaml.safe_load(text) if typ is not str else text
    except yaml.YAMLError:
        raise ConfigError(f"config: {name}={text!r} is not a value") from None
    return check_type(value, typ, name)


def check_type(value, typ, name):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typ in (int, float, str, bool) and not (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
        raise ConfigError(f"config: {name} must be {typ.__name__}, got {value!r}")
    return value


def unknown_key(section, key, known):
    """The error for a key no section field has: the closest known ones, not the whole list of them."""
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(f'{section}.{k}' for k in close)}?" if close else \
        f"python {os.path.basename(sys.argv[0])} --help lists them"
    return ConfigError(f"config: unknown key '{section}.{key}' ({hint})")


def build(cls, values, section):
    """A dataclass from a dict, refusing unknown keys, wrong types, values out of their range and strings that are
    none of their choices."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise unknown_key(section, key, fields)
        values[key] = check_type(value, fields[key].type, f"{section}.{key}")
    return check_ranges(cls(**values), section)


# A section's numbers have ranges, written as intervals in the class attribute RANGES (not a field):
#     RANGES = {"group_size": "[2, inf)", "sim_share": "[0, 1]", "lr": "(0, inf)"}
# "[" and "]" include the bound, "(" and ")" exclude it. build() checks them before any work, so a bad value is a
# one-line ConfigError, never a traceback (group_size=0) or a silent no-op (steps=-1).
# A string that names one of a few things has its choices in the class attribute CHOICES, beside RANGES:
#     CHOICES = {"loss_type": ("grpo", "dapo", "dr_grpo")}
# checked by build() too, so a typo (reward=bleu, reward=EM) is refused before any model loads, naming the key the
# user typed, instead of falling through to some default branch. A choice ending in ":N" takes any index (cuda:1).
INTERVAL = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])")


def check_ranges(obj, section):
    """obj, once each value named in its class's RANGES lies in its interval and each named in its CHOICES is one
    of them; else a ConfigError naming the key."""
    for key, interval in getattr(obj, "RANGES", {}).items():
        value = getattr(obj, key)
        opening, low, high, closing = INTERVAL.fullmatch(interval).groups()
        above = value >= float(low) if opening == "[" else value > float(low)
        below = value <= float(high) if closing == "]" else value < float(high)
        if not (above and below):
            raise ConfigError(f"config: {section}.{key}={value!r} is out of range: it must be in {interval}")
    for key, choices in getattr(obj, "CHOICES", {}).items():
        value = getattr(obj, key)
        if value not in choices and re.sub(r":\d+$", ":N", value) not in choices:
            close = difflib.get_close_matches(value.lower(), choices, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"config: {section}.{key}={value!r} is none of {' | '.join(choices)}{hint}")
    return obj


def load_config(sections, argv=None, own=None, flags=()):
    """Read --config FILE and key=value overrides into one dataclass per section.

    sections: {"run": RunConfig, "sft": SFTConfig, ...}, what this script needs; own: the section that a bare
    `key=value` belongs to; flags: {name: meaning} of the --flags this script takes (any other is refused: a typo
    such as --resum must not start a run that wipes the one it meant to resume). --help (-h) prints help_text
    and exits 0. Returns a SimpleNamespace with one attribute
    per section plus .path and .flags. Other sections in the file are checked by name only (their script
    checks their keys). Every error is a ConfigError.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        show_help(help_text(sections, own, flags, getattr(sys.modules.get("__main__"), "__doc__", None)))
    path, overrides, given = None, [], []
    while argv:
        arg = argv.pop(0)
        if arg == "--config":
            if not argv:
                raise ConfigError("config: --config needs a file")
            path = argv.pop(0)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif "=" in arg:
            overrides.append(arg.lstrip("-"))
        elif arg.startswith("--"):
            given.append(arg[2:])
        else:
            raise ConfigError(f"config: cannot read argument {arg!r} (use --config FILE and key=value)")
    unknown = [f"--{f}" for f in given if f not in flags]
    if unknown:
        known = ", ".join(f"--{f}" for f in flags) or "none"
        raise ConfigError(f"config: unknown flag {', '.join(unknown)} (this script takes: {known})")
    raw = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config: {path} is not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML: {' '.join(str(e).split())}") from None
        if raw is None:  # an empty file is a wrong or cut-short one far more often than a wish for the defaults
            raise ConfigError(f"config: {path} is empty (no settings): to run on the defaults, leave --config out")
        if not isinstance(raw, dict):
            raise ConfigError(f"config: {path} must be a mapping of sections")
    for name, body in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"config: unknown section '{name}' in {path} (known: {', '.join(SECTIONS)})")
        if not isinstance(body, dict):
            raise ConfigError(f"config: section '{name}' in {path} must be a mapping")
    values = {name: dict(raw.get(name) or {}) for name in sections}
    for item in overrides:
        key, text = item.split("=", 1)
        name, _, key = key.rpartition(".")
        name = name or own
        if name not in sections:
            raise ConfigError(f"config: override '{item}' names no section of this script ({', '.join(sections)})")
        fields = {f.name: f.type for f in dataclasses.fields(sections[name])}
        if key not in fields:
            raise unknown_key(name, key, fields)
        values[name][key] = parse_value(text, fields[key], f"{name}.{key}")
    cfg = {name: build(cls, values[name], name) for name, cls in sections.items()}
    return _Namespace(cfg, path=path, flags=given)


class _Namespace(dict):
    """cfg.sft.lr reads like a module of globals; dict() of it is what goes into a checkpoint."""

    def __init__(self, sections, path=None, flags=()):
        super().__init__(sections)
        self.path, self.flags = path, list(flags)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self):
        return {name: dataclasses.asdict(section) for name, section in self.items()}


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


NOT_JSON = object()  # stands for a line that does not parse
NOT_UTF8 = object()  # stands for a line whose bytes are not UTF-8 text


def check_rows(placed, check, what="row", on_bad="skip", warn=print):
    """Keep the (place, row) pairs that `check(row)` finds nothing wrong with (it returns a reason or None).

    A bad row is reported as "place: ...", then skipped (on_bad='skip') or raised as a ConfigError ('raise').
    """
    good = []
    for place, row in placed:
        problem = "not JSON" if row is NOT_JSON else "not UTF-8 text" if row is NOT_UTF8 else check(row)
        if problem and on_bad == "raise":
            raise ConfigError(f"{place}: bad {what}: {problem}")
        if problem:
            warn(f"warning: {place}: skipped bad {what}: {problem}")
        else:
            good.append((place, row))
    return good


def read_jsonl(path, check, what="row", on_bad="skip", warn=print):
    """[(place, row)] of a JSONL file ("file:line", row), checked by check_rows; blank lines are ignored.

    Lines are read as bytes and decoded one by one, so undecodable bytes are a bad row with its file and line.
    """
    def load(line):
        try:
            return json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            return NOT_UTF8
        except ValueError:
            return NOT_JSON
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a folder, not a JSONL file")
    with open(path, "rb") as f:
        placed = [(f"{path}:{n}", load(line)) for n, line in enumerate(f, 1) if line.strip()]
    return check_rows(placed, check, what, on_bad, warn)


def check_corpus_row(row):
    if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("contents"), str):
        return "needs 'id' and a string 'contents'"
    return None


def read_corpus(path):
    """Corpus JSONL rows {"id", "contents"}; a bad line is a ConfigError with file and line number."""
    rows = [{"id": str(row["id"]), "contents": row["contents"]}
            for _, row in read_jsonl(path, check_corpus_row, "corpus row", on_bad="raise")]
    if not rows:
        raise ConfigError(f"{path}: no corpus rows (an empty file)")
    return rows


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


class HTTPSearch:
    """Client of a Search-R1 / FlashRAG retrieval server: POST {url} {"queries", "topk", "return_scores"}.

    The reply is {"result": [[{"document": {"contents": ...}, "score": ...}, ...], ...]} (Search-R1) or
    [[{"contents": ...}, ...], ...]. One call has one deadline, `timeout_s`, for everything: connecting, sending and
    reading the whole reply, retries and their exponential backoff included, so a server that trickles its reply
    a byte at a time costs at most timeout_s (a per-read timeout never fires on it). Then ToolError, naming the URL
    and the cause of the last try.
    """

    def __init__(self, url, timeout_s=10.0, retries=2, backoff_s=0.5):
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s

    def __call__(self, queries, k=2):
        deadline = time.monotonic() + self.timeout_s
        body = json.dumps({"queries": list(queries), "topk": k, "return_scores": True}).encode()
        error, tries = None, 0
        while tries <= self.retries and (not tries or time.monotonic() < deadline):
            if tries:
                time.sleep(min(self.backoff_s * 2 ** (tries - 1), max(0.0, deadline - time.monotonic())))
            tries += 1
            try:
                return self._passages(json.loads(post(self.url, body, deadline)), len(queries))
            except (OSError, http.client.HTTPException, ValueError) as e:
                error = e
        cause = failure_cause(error)
        detail = f" ({error})" if str(error) != cause else ""
        raise ToolError(f"retrieval server {self.url} failed after {tries} tr{'ies' if tries > 1 else 'y'} "
                        f"within {self.timeout_s:g}s: {cause}{detail}", cause)

    @staticmethod
    def _passages(reply, n):
        rows = reply.get("result") if isinstance(reply, dict) else reply
        if not isinstance(rows, list) or len(rows) != n:
            raise ValueError(f"malformed reply: expected a list of {n} results")
        out = []
        for row in rows:
            passages = []
            for hit in row if isinstance(row, list) else []:
                doc = hit.get("document", hit) if isinstance(hit, dict) else {}
                if isinstance(doc, dict) and isinstance(doc.get("contents"), str):
                    passages.append(doc["contents"])
            out.append(passages)
        return out


class HTTPStatusError(OSError):
    """A reply whose status is not 2xx."""

    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.status = status


def post(url, body, deadline):
    """POST a JSON body and return the reply's body, all of it done by `deadline` (time.monotonic()) or
    TimeoutError: every socket operation waits only for the time left, so no way of answering slowly can stretch
    the call. One connection per call (Connection: close)."""
    import socket
    parts = urllib.parse.urlsplit(url)
    host, https = parts.hostname, parts.scheme == "https"

    def left():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        return remaining
    with socket.create_connection((host, parts.port or (443 if https else 80)), timeout=left()) as sock:
        if https:
            import ssl
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = (f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        sock.settimeout(left())
        sock.sendall(head.encode() + body)
        reply = http.client.HTTPResponse(_DeadlineReader(sock, left))
        reply.begin()  # the status line and headers, then the body: Content-Length, chunked or up to the close
        data = reply.read()
    if not 200 <= reply.status < 300:
        raise HTTPStatusError(reply.status)
    return data


class _DeadlineReader(io.RawIOBase):
    """A socket's reads for http.client, each one waiting only for the time left (`left()`)."""

    def __init__(self, sock, left):
        self.sock, self.left = sock, left

    def readable(self):
        return True

    def readinto(self, buffer):
        self.sock.settimeout(self.left())
        return self.sock.recv_into(buffer)

    def makefile(self, mode):
        return io.BufferedReader(self)


def failure_cause(error):
    """The short cause of a failed HTTP search, as a person would say it."""
    if isinstance(error, HTTPStatusError):
        return f"HTTP {error.status}"
    if isinstance(error, TimeoutError):  # socket.timeout is TimeoutError
        return "timeout"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (OSError, http.client.HTTPException)):
        return "connection failed"
    if isinstance(error, ValueError):  # json's JSONDecodeError and a UnicodeDecodeError are ValueErrors
        return "bad JSON" if "malformed reply" not in str(error) else "malformed reply"
    return type(error).__name__


def make_tool(env, run=None):
    if env.tool == "bm25":
        return BM25Search(env.corpus or os.path.join(run.data_dir if run else "data/tiny", "corpus.jsonl"))
    if env.tool == "http":
        return HTTPSearch(env.url, env.timeout_s, env.retries)
    raise ConfigError(f"config: env.tool must be bm25 or http, got {env.tool!r}")


def truncation_warning(share, env, where):
    """One line when more than env.truncation_warn of the trajectories stopped at the length budget, else ""."""
    if share <= env.truncation_warn:
        return ""
    return (f"{where}: warning: {share:.0%} of trajectories stopped at env.max_new_tokens={env.max_new_tokens} "
            f"(observations included), more than env.truncation_warn={env.truncation_warn:g}: raise max_new_tokens")


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
    return f"{env.obs_open} {body.strip()} {env.obs_close}"


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
            observations = [f"{self.env.obs_open} search failed: {cause} {self.env.obs_close}"] * len(queries)
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
# Models: any HF causal LM by path or name

def pick_device(run):
    import torch
    if run.device != "auto":
        return torch.device(run.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(run, device):
    import torch
    if run.dtype != "auto":
        return getattr(torch, run.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def master_dtype(run):
    """The dtype trained weights are kept in: run.dtype, or float32 for "auto" (bf16 compute, where asked, comes
    from FSDP2's MixedPrecisionPolicy over these fp32 masters)."""
    import torch
    return getattr(torch, run.dtype) if run.dtype != "auto" else torch.float32


def is_hub_id(name):
    """An owner/name the hub could hold (a path such as runs/tiny/sft123 or ./x is not one)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith(".") and \
        not os.path.isdir(name.split("/")[0])  # runs/sft2 with a runs/ folder here: a local path


def missing_model(path, what="model"):
    """The one-line error for a model folder that is not there: which folder, and which script writes it."""
    name = os.path.basename(os.path.normpath(path))
    writer = ("rl.py (rl.out=NAME)" if name.startswith("rl") else "worldmodel.py (worldmodel.out=NAME)"
              if name.startswith("worldmodel") else "sft.py (sft.out=NAME)" if name.startswith(("sft", "cot"))
              else "the stage whose out= is NAME").replace("NAME", name)
    return ConfigError(f"{what}: no model folder {path!r} ({writer} writes it; demo.py runs every stage)")


MODEL_FILES = (("config.json", ("config.json",)),  # what from_pretrained needs in a folder, and the files that give it
               ("weights (model.safetensors)", ("model.safetensors", "model.safetensors.index.json",
                                                "pytorch_model.bin", "pytorch_model.bin.index.json")),
               ("tokenizer (tokenizer.json)", ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                               "vocab.json")))


def check_model_folder(path, what="model"):
    """path, once it holds what from_pretrained needs (MODEL_FILES); else a one-line ConfigError naming what is
    missing (transformers says it in a long traceback, and only once the run has loaded everything else)."""
    if os.path.isfile(os.path.join(path, "meta.json")) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{path} is a checkpoint to resume from, not a model folder: the run's model is "
                          f"{os.path.dirname(os.path.normpath(path)).removesuffix('.ckpt')} (written when it ends)")
    missing = [name for name, files in MODEL_FILES if not any(os.path.isfile(os.path.join(path, f)) for f in files)]
    if missing:
        raise ConfigError(f"{what}: {path!r} is not a model folder: it has no {' and no '.join(missing)}")
    return path


def model_path(name, run_dir, what="model"):
    """The folder a config's model name means: a folder, a stage output <run_dir>/<name>, or an owner/name hub
    id; anything else, or a folder that is not a model, is a ConfigError naming the folder expected under run_dir,
    before any hub call."""
    staged = os.path.join(run_dir, name)
    if os.path.isdir(name):
        return check_model_folder(name, what)
    if os.path.isdir(staged):
        return check_model_folder(staged, what)
    if is_hub_id(name):
        return name
    raise missing_model(staged if os.sep not in name else name, what)


def load_model(path, run=None, device=None, dtype=None):
    """(model, tokenizer) from an HF folder or hub name; the tokenizer as load_tokenizer gives it."""
    from transformers import AutoModelForCausalLM
    tokenizer = load_tokenizer(path)
    run = run or RunConfig()
    device = device or pick_device(run)
    dtype = dtype or pick_dtype(run, device)
    if device.type == "meta":  # the structure without the weights (plumbing.load_sharded: FSDP2 ranks but rank 0)
        from transformers import AutoConfig
        with device:
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype), tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model, tokenizer


def load_tokenizer(path):
    """The tokenizer of an HF folder or hub name as every script uses it: padding on the left (rollout.py needs
    it), EOS as the pad token where it has none.

    A path that is not a folder and not a hub id (or a hub id not cached while HF_HUB_OFFLINE=1) is a one-line
    ConfigError before any hub call: offline, transformers would retry the hub for minutes and never say which
    local folder was meant.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    if not os.path.isdir(path) and (not is_hub_id(path) or (
            constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(path, "config.json"), str))):
        raise missing_model(path)
    if os.path.isdir(path):
        check_model_folder(path)
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:  # a hub name the hub cannot serve (no network, a typo, a gated model): transformers' cause
        if os.path.isdir(path):
            raise
        raise ConfigError(f"model: cannot load {path!r} from the Hugging Face hub: {str(e).splitlines()[0]}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -----------------------------------------------------------------------------
# The retrieval server: python tools.py serve --corpus data/wiki/corpus.jsonl --port 8000
#
# The Search-R1 / FlashRAG wire format, the one HTTPSearch reads, over any corpus JSONL:
#     POST /retrieve {"queries": ["...", ...], "topk": 3, "return_scores": true}
#     -> {"result": [[{"document": {"id": "12", "contents": "Title\ntext"}, "score": 7.1}, ...], ...]}
#        (return_scores false: the documents alone, as Search-R1 does);
#     GET /health -> {"docs", "retriever", "cut", "dropped"} (the last two: PoolServer's counts).
# bm25 (default): BM25Search, its index built once and cached beside the corpus, loaded memory-mapped.
# e5: an e5-style encoder (mean pooling, "query: " / "passage: " prefixes, unit vectors) and a faiss exact
# inner-product (Flat) index; needs faiss (`pip install faiss-cpu`, or faiss-gpu: an optional extra). The paper's
# retriever over wiki-18 is Search-R1's prebuilt e5-base-v2 Flat index, so nothing encodes 21M passages here:
#     huggingface-cli download PeterJinGo/wiki-18-e5-index part_aa part_ab --repo-type dataset --local-dir wiki18
#     huggingface-cli download PeterJinGo/wiki-18-corpus wiki-18.jsonl.gz --repo-type dataset --local-dir wiki18
#     cat wiki18/part_* > wiki18/e5_Flat.index && gzip -d wiki18/wiki-18.jsonl.gz
#     python tools.py serve --retriever e5 --corpus wiki18/wiki-18.jsonl --index wiki18/e5_Flat.index --device cuda
# --device cuda puts the encoder on the GPU (fp16, as Search-R1 does) and, where faiss-gpu is installed, the index
# on every visible GPU (fp16, sharded; CUDA_VISIBLE_DEVICES picks them), else faiss searches on the CPU.
# Without --index, the corpus is encoded once (on --device) and the index cached beside it.
# Connections: one front thread reads each request in full (headers and body) before a worker takes it, so clients
# that send slowly or not at all hold no worker; one deadline, --timeout_s from a connection's opening or its
# previous reply, closes a connection whose request is not complete by then ("cut"). --workers threads answer
# complete requests; a client gone before its reply is counted ("dropped"), never a traceback.
# Retrieval, with no lock: bm25 is called from the workers at once (bm25s only reads its index: the same answers
# from 8 threads as alone, and a batch of queries costs bm25s no less per query than one). e5 goes through a Batcher:
# one thread calls the retriever, and the requests that queue meanwhile are searched together in its next call
# (--max_batch queries at most): one encoder forward and one pass of faiss over the index for all of them, what a
# GPU wants, and what an exact (Flat) index on the CPU needs (each search reads every vector); faiss's GPU indexes
# also take one calling thread only (faiss's wiki, "Threads and asynchronous calls"), so e5 on cuda refuses 0.
# --max_batch 1: one request a call, in order of arrival; 0: the workers call the retriever directly.
# A body over --max_bytes is refused with 413, anything malformed with 400 and a JSON {"error"}; a failure inside
# retrieval is a 500 with its message (for every request searched in that call), and the server keeps serving.
# Not here: reranking, building approximate (HNSW/IVF) indexes, chunked request bodies, Expect: 100-continue
# (answered only once the body is in: a client that waits for it sends its body after its own wait); the corpus is
# held in memory (wiki-18's 21M rows: tens of GB of RAM).

class DenseSearch:
    """e5-style dense retrieval: mean-pooled unit embeddings, exact inner-product search with faiss."""

    def __init__(self, corpus_path, model_name="intfloat/e5-base-v2", batch_size=64, device="cpu", index_path=None):
        import faiss
        import torch
        from transformers import AutoModel, AutoTokenizer
        self.torch, self.device, self.batch_size = torch, device, batch_size
        self.docs = read_corpus(corpus_path)
        path = index_path or f"{corpus_path}.{os.path.basename(model_name.rstrip('/'))}.faiss"
        built = index_path or (os.path.exists(path) and os.path.getmtime(path) > os.path.getmtime(corpus_path))
        if built:
            self.index = faiss.read_index(path)
            if self.index.ntotal != len(self.docs):  # vector i is row i: another corpus's index answers garbage
                raise ConfigError(f"serve: index {path} holds {self.index.ntotal} vectors, corpus {corpus_path} "
                                  f"{len(self.docs)} rows: they must come from the same corpus")
        self.tokenizer = AutoTokenizer.from_pretrained(model_name)
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        self.model = AutoModel.from_pretrained(model_name, dtype=dtype).to(device).eval()
        if not built:
            vectors = self.encode(["passage: " + d["contents"] for d in self.docs])
            self.index = faiss.IndexFlatIP(vectors.shape[1])
            self.index.add(vectors)
            faiss.write_index(self.index, path + ".tmp")
            os.replace(path + ".tmp", path)
        self.faiss_gpus = faiss.get_num_gpus() if str(device).startswith("cuda") else 0  # faiss-cpu: 0
        if self.faiss_gpus:
            options = faiss.GpuMultipleClonerOptions()
            options.useFloat16, options.shard = True, True  # wiki-18's 21M x 768 fp32 vectors are 64 GB
            self.index = faiss.index_cpu_to_all_gpus(self.index, co=options)

    def encode(self, texts):
        """(n, d) float32 numpy of unit vectors: the mean of the last hidden states over real tokens."""
        out = []
        with self.torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True, max_length=256,
                                       return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()  # (B, T, d)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1)
                out.append(self.torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return self.torch.cat(out).numpy()

    def search(self, queries, k):
        scores, idx = self.index.search(self.encode(["query: " + q for q in queries]), k)
        return idx.tolist(), scores.tolist()


class Batcher:
    """search(queries, k) for many threads through one: the requests that wait while a search runs are searched
    together in the next call (at most max_batch queries, a request never split), each reply its own rows."""

    def __init__(self, search, max_batch=512):
        import queue
        import threading
        self.search, self.max_batch, self.jobs = search, max_batch, queue.Queue()
        threading.Thread(target=self.run, daemon=True).start()

    def __call__(self, queries, k):
        import threading
        job = {"queries": queries, "k": k, "done": threading.Event()}
        self.jobs.put(job)
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["idx"], job["scores"]

    def run(self):
        import queue
        while True:
            jobs = [self.jobs.get()]
            while sum(len(j["queries"]) for j in jobs) < self.max_batch:
                try:
                    jobs.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            for k in {j["k"] for j in jobs}:  # one call per topk, so each query gets exactly its own top k
                same = [j for j in jobs if j["k"] == k]
                try:
                    idx, scores = self.search([q for j in same for q in j["queries"]], k)
                except Exception as e:  # every request of this call answers with it (a 500); the thread lives on
                    for j in same:
                        j["error"] = e
                    idx = scores = []
                start = 0
                for j in same:
                    n = len(j["queries"])
                    j["idx"], j["scores"] = idx[start:start + n], scores[start:start + n]
                    start += n
                    j["done"].set()


def check_request(body, max_queries, max_topk):
    """(queries, topk, return_scores) of a decoded /retrieve body, or ValueError with what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    queries, topk = body.get("queries"), body.get("topk", 3)
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ValueError("'queries' must be a list of strings")
    if len(queries) > max_queries:
        raise ValueError(f"at most {max_queries} queries per request, got {len(queries)}")
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= max_topk:
        raise ValueError(f"'topk' must be an integer from 1 to {max_topk}")
    return queries, topk, bool(body.get("return_scores", False))


def make_handler(retriever, docs, name, max_bytes=1 << 20, max_queries=1024, max_topk=100):
    """The request handler class, bound to one retriever: search(queries, k) -> (indices, scores), called from
    several worker threads at once (a Batcher makes any retriever safe for that).
    It answers one request that PoolServer has read in full: from memory, into memory."""
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client's requests reuse one connection

        def setup(self):
            self.connection, data = self.request
            self.rfile, self.wfile = io.BytesIO(data), io.BytesIO()

        def handle(self):  # one request: the next one on this connection is the front's to read
            self.handle_one_request()

        def finish(self):  # the worker sends wfile's bytes
            pass

        def reply(self, code, obj):
            data = json.dumps(obj, ensure_ascii=False).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path != "/health":
                return self.reply(404, {"error": "GET /health or POST /retrieve"})
            self.reply(200, {"docs": len(docs), "retriever": name, **self.server.counts})

        def do_POST(self):
            if self.path != "/retrieve":
                return self.reply(404, {"error": "POST /retrieve"})
            try:
                size = int(self.headers.get("Content-Length", ""))
            except ValueError:
                size = None
            if size is None or size < 0:
                self.close_connection = True  # where the body ends is unknown: this connection cannot be reused
                return self.reply(411 if "Content-Length" not in self.headers else 400,
                                  {"error": f"a Content-Length from 0 to {max_bytes} is required"})
            if size > max_bytes:
                self.close_connection = True  # the body is not read: this connection cannot be reused
                return self.reply(413, {"error": f"request body over {max_bytes} bytes"})
            try:
                queries, topk, with_scores = check_request(json.loads(self.rfile.read(size)), max_queries, max_topk)
            except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                return self.reply(400, {"error": str(e)})
            k = min(topk, len(docs))
            try:
                idx, scores = retriever(queries, k) if queries and k else ([[]] * len(queries),) * 2
            except Exception as e:  # a retrieval failure answers this request, the server lives on
                return self.reply(500, {"error": f"{type(e).__name__}: {e}"})
            result = []
            for n, row in enumerate(idx):
                hits = [docs[i] for i in row]
                result.append([{"document": d, "score": float(s)} for d, s in zip(hits, scores[n])]
                              if with_scores else hits)
            self.reply(200, {"result": result})

        def log_message(self, *args):  # one line per request would drown the console under load
            pass

    return Handler


def request_size(data, max_bytes, max_head=1 << 16):
    """Bytes of the first whole request in `data` (headers and body), or None while it is incomplete. A request
    whose headers outgrow max_head, or whose Content-Length is not one from 0 to max_bytes, is whole at the end of
    its headers: the handler refuses it without its body."""
    blank = re.search(rb"\r?\n\r?\n", data)  # the blank line after the headers (http.server takes bare LFs too)
    if not blank:
        return len(data) if len(data) > max_head else None
    found = re.search(rb"\ncontent-length:[ \t]*([0-9]+)[ \t]*\r?\n", data[:blank.end()], re.IGNORECASE)
    size = int(found.group(1)) if found and int(found.group(1)) <= max_bytes else 0
    return blank.end() + size if len(data) >= blank.end() + size else None


class PoolServer:
    """A listening socket, one front thread (serve_forever) and `workers` threads.

    The front owns every connection that is not being answered: a selector reads what each client sends until its
    request is whole (request_size), then a worker takes it; so a client that trickles, stalls or idles holds no
    worker, however many there are. One deadline per request: timeout_s after the connection opened or its previous
    reply was sent, an incomplete request is closed. A worker runs the handler, sends the reply (bounded by
    timeout_s as a whole: sendall's timeout) and gives a keep-alive connection back to the front."""

    def __init__(self, address, handler, workers=32, timeout_s=30.0, max_bytes=1 << 20):
        import queue
        import socket
        import threading
        self.socket = socket.create_server(address, backlog=1024)  # a burst waits in the backlog, never reset
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.handler, self.timeout_s, self.max_bytes = handler, timeout_s, max_bytes
        self.whole, self.returned = queue.Queue(), queue.Queue()  # requests for the workers; connections back
        self.wake, self.waker = socket.socketpair()  # a worker's byte wakes the front to take a connection back
        self.counts, self.count_lock = {"cut": 0, "dropped": 0}, threading.Lock()
        for _ in range(workers):  # daemon threads: serve_forever's end ends the server
            threading.Thread(target=self.work, daemon=True).start()

    def serve_forever(self):
        import selectors
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.socket, selectors.EVENT_READ)
        self.selector.register(self.wake, selectors.EVENT_READ)
        self.open = {}  # connection -> [address, bytes received, deadline]
        while True:
            first = min((c[2] for c in self.open.values()), default=time.monotonic() + 1)
            for key, _ in self.selector.select(max(0.0, first - time.monotonic())):
                if key.fileobj is self.socket:
                    self.accept()
                elif key.fileobj is self.wake:
                    self.wake.recv(4096)
                    while not self.returned.empty():
                        self.watch(*self.returned.get())
                else:
                    self.receive(key.fileobj)
            now = time.monotonic()
            for sock in [s for s, c in self.open.items() if c[2] <= now]:
                self.count("cut", bool(self.open[sock][1]))  # an idle keep-alive connection is closed, not cut
                self.selector.unregister(sock)
                del self.open[sock]
                self.close(sock)

    def accept(self):
        while True:
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError:  # out of file descriptors: the rest wait in the backlog until some close
                time.sleep(0.05)
                return
            self.watch(sock, address, b"")

    def watch(self, sock, address, data):
        """Read this connection's next request (data: what it sent already), due timeout_s from now."""
        import selectors
        sock.setblocking(False)
        self.open[sock] = [address, data, time.monotonic() + self.timeout_s]
        self.selector.register(sock, selectors.EVENT_READ)
        self.hand_over(sock)

    def receive(self, sock):
        try:
            data = sock.recv(1 << 16)
        except OSError:  # reset by the client
            data = b""
        if not data:  # the client hung up
            self.selector.unregister(sock)
            del self.open[sock]
            return self.close(sock)
        self.open[sock][1] += data
        self.hand_over(sock)

    def hand_over(self, sock):
        address, data, _ = self.open[sock]
        size = request_size(data, self.max_bytes)
        if size is not None:
            self.selector.unregister(sock)
            del self.open[sock]
            self.whole.put((sock, address, data))

    def work(self):
        while True:
            sock, address, data = self.whole.get()
            try:
                handler = self.handler((sock, data), address, self)
                sock.settimeout(self.timeout_s)  # the whole reply: a client that does not read it is cut off
                sock.sendall(handler.wfile.getvalue())
            except OSError:  # the client left (reset, broken pipe) or would not take its reply in time
                self.count("dropped")
                self.close(sock)
                continue
            except Exception:  # a bug in the handler: its traceback, and the worker lives on
                import traceback
                traceback.print_exc()
                self.close(sock)
                continue
            if handler.close_connection:
                self.close(sock)
            else:  # keep-alive: the front reads the next request, with what the client sent past this one
                self.returned.put((sock, address, handler.rfile.read()))
                self.waker.send(b"\0")

    def count(self, what, n=1):
        with self.count_lock:
            self.counts[what] += n

    @staticmethod
    def close(sock):
        import socket
        try:
            sock.shutdown(socket.SHUT_WR)  # the reply goes out before the close, even with unread input
        except OSError:
            pass
        sock.close()

    def server_close(self):
        self.socket.close()


def serve(argv=None):
    """Listen, build or load the index, then serve until interrupted; prints the URL and the index size."""
    import argparse
    ap = argparse.ArgumentParser(prog="python tools.py serve", description="Search-R1-style retrieval server")
    ap.add_argument("--corpus", required=True, help="corpus JSONL with {'id', 'contents'} rows")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=8000, help="0 = any free port (the URL printed says which)")
    ap.add_argument("--retriever", default="bm25", choices=["bm25", "e5"],
                    help="bm25 (index cached beside the corpus) or e5 (dense: an encoder and faiss)")
    ap.add_argument("--model", default="intfloat/e5-base-v2", help="encoder for --retriever e5")
    ap.add_argument("--index", default=None, help="a prebuilt faiss index of the corpus for --retriever e5 "
                    "(Search-R1's e5_Flat.index for wiki-18.jsonl); default: encode the corpus once, cache it")
    ap.add_argument("--device", default="cpu", help="encoder device for --retriever e5 (cuda: faiss-gpu too)")
    ap.add_argument("--max_bytes", type=int, default=1 << 20, help="largest request body (bigger: 413)")
    ap.add_argument("--workers", type=int, default=32, help="threads answering whole requests")
    ap.add_argument("--max_batch", type=int, default=None, help="most queries searched in one retriever call, "
                    "for the requests that wait (0: each worker calls the retriever; default: 0 for bm25, 512 for e5)")
    ap.add_argument("--timeout_s", type=float, default=30.0,
                    help="a request not whole this long after its connection opened (or its previous reply) "
                         "is closed; also the bound on sending a reply")
    args = ap.parse_args(argv)
    if min(args.workers, args.max_bytes) < 1 or (args.max_batch or 0) < 0 or args.timeout_s <= 0:
        raise ConfigError("serve: --workers and --max_bytes must be >= 1, --max_batch >= 0, --timeout_s > 0")
    if not os.path.exists(args.corpus):
        raise ConfigError(f"serve: no corpus file {args.corpus!r}")
    if args.index and not os.path.isfile(args.index):
        raise ConfigError(f"serve: no index file {args.index!r}")
    max_batch = args.max_batch if args.max_batch is not None else 512 if args.retriever == "e5" else 0
    if args.retriever == "e5" and args.device.startswith("cuda") and max_batch == 0:
        raise ConfigError("serve: --retriever e5 on cuda needs --max_batch >= 1 (one thread calls the GPU)")
    t0 = time.time()
    server = listen(args)  # before the index loads: a busy port fails at once, not after minutes of loading
    if args.retriever == "bm25":
        tool = BM25Search(args.corpus, mmap=True)
        size, where = _dir_bytes(args.corpus + ".bm25"), ""
    else:
        try:
            tool = DenseSearch(args.corpus, args.model, device=args.device, index_path=args.index)
        except ImportError as e:
            raise ConfigError(f"serve: --retriever e5 needs faiss and transformers ({e}); pip install faiss-cpu")
        size = tool.index.ntotal * tool.index.d * 4
        where = f", faiss on {tool.faiss_gpus} GPU(s)" if tool.faiss_gpus else ", faiss on the CPU"
    retriever = Batcher(tool.search, max_batch) if max_batch else tool.search
    server.handler = make_handler(retriever, tool.docs, args.retriever, args.max_bytes)
    host, port = server.server_address[:2]
    print(f"serve: {args.retriever} over {len(tool.docs)} docs, index {size / 2**20:.1f} MiB{where}, "
          f"ready in {time.time() - t0:.1f}s", flush=True)
    print(f"serve: http://{host}:{port}/retrieve", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def listen(args):
    """The PoolServer on --host:--port, or a one-line RunError in the OS's words (a port in use: errno 98)."""
    try:
        return PoolServer((args.host, args.port), None, args.workers, args.timeout_s, args.max_bytes)
    except OSError as e:
        import errno
        hint = " (another server? pick another --port, or 0 for any free one)" if e.errno == errno.EADDRINUSE else ""
        cause = os.strerror(e.errno) if (e.errno or 0) > 0 else "the host name does not resolve"  # < 0: getaddrinfo
        raise RunError(f"serve: cannot listen on {args.host}:{args.port}: {cause}{hint}")


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)

if __name__ == "__main__":
    USAGE = ("usage: python tools.py serve --corpus PATH [--port 8000] [--host 127.0.0.1] [--retriever bm25|e5]\n"
             "       (python tools.py serve --help: every option; the rest of tools.py is a library)")
    if sys.argv[1:2] in (["--help"], ["-h"]):
        print(USAGE)
    elif sys.argv[1:2] != ["serve"]:
        raise SystemExit(USAGE)
    else:
        cli(serve, sys.argv[2:])
