"""
config.py -- what a script is told and how it ends: the config, the command line, --help, errors.

One YAML file, one section per stage; each section is a dataclass owned by the file that uses it (RunConfig, the
run's folder, seed, device and dtype, is here: every script reads it; EnvConfig, the CoA format and the tool, is in
tools.py). Precedence: dataclass defaults < YAML < command line `section.key=value` (or `key=value` for the
script's own section). Unknown sections, unknown keys, wrong types, values out of their RANGES and strings that are
none of their CHOICES raise a ConfigError with the key's name, before any work:

    cfg = load_config({"run": RunConfig, "env": EnvConfig, "rl": RLConfig}, argv, own="rl", flags=RUN_FLAGS)
    cfg.rl.lr, cfg.env.topk          # one attribute per section; cfg.to_dict() goes into each checkpoint

--help is built from the same dataclasses: each key's meaning is its field's `# comment`, so it cannot drift.
Every entry point runs as `cli(main)`: a ConfigError (bad usage) is one line and exit 2, a RunError (what the run
depends on failed: a server, a full disk) one line and exit 1, Ctrl-C and SIGTERM one line and 130 / 143.
Input files are checked row by row as they are read (read_jsonl): a bad row names its file and line.

Not here: the settings themselves (each stage's dataclass, in its file), model loading (plumbing.py).
"""
import contextlib
import dataclasses
import difflib
import functools
import inspect
import io
import json
import os
import re
import shutil
import signal
import sys
import textwrap
import threading
import time
import tokenize
from dataclasses import dataclass

import yaml

# -----------------------------------------------------------------------------
# Errors and the entry point: a user's mistake or a failed dependency is one line, not a traceback

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
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that both unwind a run the same way (cli)."""


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
    """plumbing.stop_runs where plumbing is loaded (plumbing imports config: a script that never imported it holds
    no lock)."""
    plumbing = sys.modules.get("plumbing")
    return plumbing.stop_runs(signal_name) if plumbing else ""


def backoff(retries, backoff_s, deadline=None):
    """Try numbers 1 .. 1 + retries for a `for tries in backoff(...)` loop that returns on success, sleeping
    backoff_s * 2 ** (n - 1) before retry n; past `deadline` (time.monotonic()) no retry starts and no sleep runs.
    A failed dependency retried: the loop of server.HTTPSearch, data.py's endpoint teacher and eval.py's judge."""
    for n in range(retries + 1):
        if n:
            if deadline is not None and time.monotonic() >= deadline:
                return
            delay = backoff_s * 2 ** (n - 1)
            time.sleep(delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic())))
        yield n + 1


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


# -----------------------------------------------------------------------------
# --help: a script's flags and every key of its config sections with type, default and meaning. The meaning is
# the field's trailing `# comment` in its dataclass (a comment line indented under the field continues it; one
# at the field's indent is a heading), read from the source, so the help cannot drift from the code
# (tests/test_help.py checks that every field of every section has one).

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
    """The --help of a script: usage, the first paragraph of its docstring and its first commands (examples), its
    flags, then its own section's keys, then the sections it shares with other scripts (run, env, ...), each key as
    `section.key  type = default  meaning`: what is particular to the script comes before what every script takes."""
    prog = prog or os.path.relpath(sys.argv[0])
    flags = flags if isinstance(flags, dict) else dict.fromkeys(flags or (), "")
    usage = " ".join(["usage: python", prog, "[--config FILE]" if any(sections) else "",
                      *(f"[--{f}]" for f in flags), "[key=value ...]"])
    lines = [" ".join(usage.split())]
    if doc:
        lines += ["", doc.strip().split("\n\n")[0]]
        runs = examples(doc, prog)
        if runs:
            lines += ["", "for example:"] + [f"  {run}" for run in runs]
    described = {"--config FILE": "YAML, one mapping per section: its values replace the defaults below, and "
                                  "key=value arguments replace both"} if any(sections) else {}
    described.update({f"--{name}": meaning for name, meaning in flags.items()})
    described["-h, --help"] = "print this help and exit"
    lines += ["", "flags:"] + [textwrap.fill(meaning, 118, initial_indent=f"  {name:<16}", subsequent_indent=" " * 18)
                               for name, meaning in described.items()]
    if own in sections:
        lines += section_help(own, sections[own], f" (a bare key=value means {own}.key)")
    shared = [name for name in sections if name != own]
    if own in sections and shared:
        lines += ["", f"shared sections ({', '.join(shared)}): the same keys in every script that reads them"]
    for name in shared:
        lines += section_help(name, sections[name])
    if doc:
        lines += ["", f"The docstring at the top of {prog} explains what it does and how."]
    return "\n".join(lines)


def examples(doc, prog, most=2):
    """The first commands in a docstring that run prog (`python prog ...`, `torchrun ... prog ...`)."""
    runs = [line.strip() for line in doc.splitlines() if line.strip().startswith(("python ", "torchrun "))]
    return [run for run in runs if os.path.basename(prog) in map(os.path.basename, run.split())][:most]


def section_help(name, cls, note=""):
    """The lines of one section in a --help: a heading, then `section.key  type = default  meaning` per key."""
    lines = ["", f"{name}:{note}" if name else "keys:"]
    meanings = field_help(cls)
    for f in dataclasses.fields(cls):
        default = repr(f.default) if len(repr(f.default)) < 60 else repr(f.default)[:50] + "...'"
        key = f"  {name + '.' if name else ''}{f.name}  {f.type.__name__} = {default}"
        text = meanings.get(f.name, "")
        if len(key) > 44:
            lines += [key, textwrap.fill(text, 118, initial_indent=" " * 46, subsequent_indent=" " * 46)]
        else:
            lines.append(textwrap.fill(text, 118, initial_indent=f"{key:<46}", subsequent_indent=" " * 46))
    return lines


# -----------------------------------------------------------------------------
# Reading a config: YAML, then key=value, into one checked dataclass per section

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
    path, overrides, given = read_argv(argv, flags)
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


def read_argv(argv, flags=()):
    """(config path or None, key=value overrides in order, {flag: its value, or True}) of a command line: --config
    FILE (or --config=FILE), key=value (leading dashes dropped), --flag, and --flag VALUE for a flag named "flag N"
    in `flags`. A flag not in `flags` (a typo such as --resum must not start a run that wipes the one it meant to
    resume) or a bare word is a ConfigError."""
    argv, path, overrides, given = list(argv), None, [], {}
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
            given[arg[2:]] = (argv.pop(0) if argv else "") if f"{arg[2:]} N" in flags else True
        else:
            raise ConfigError(f"config: cannot read argument {arg!r} (use --config FILE and key=value)")
    unknown = [f"--{f}" for f in given if f not in flags and f"{f} N" not in flags]
    if unknown:
        known = ", ".join(f"--{f}" for f in flags) or "none"
        raise ConfigError(f"config: unknown flag {', '.join(unknown)} (this script takes: {known})")
    return path, overrides, given


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
# Input files: JSONL read row by row, each row checked, a bad one named by file and line

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


def read_metrics(path):
    """[(place, row)] of a metrics log; a line that is not a JSON object (a write cut by a kill or a full disk) is
    named and skipped, so a run still resumes and a report still reads the rest."""
    return read_jsonl(path, lambda row: None if isinstance(row, dict) else "not a JSON object", "metrics row")


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
