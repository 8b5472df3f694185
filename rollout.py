"""
rollout.py -- the sampling engine every stage goes through: a KV-cached, batched generator that stops a
sequence at its action, runs the tool for all paused sequences in one call, appends each observation to that
sequence's cache, and goes on (AutoCoA, arXiv 2503.06580, Sec. 3 and Algorithm 1).

    rollout(model, tokenizer, rows, env_cfg, environment, group_size=G) -> [Episode, ...]   (len(rows) * G)
    generate(model, tokenizer, prompt_ids, max_new_tokens, stop_strings) -> (ids, logps)    no tools

One trajectory (completion ids after the prompt, with the loss mask):

    <think> I need to search. <begin_search> Ada Brun </end_search>      mask 1 (the model wrote it)
    <search_result> Ada Brun was born in Lorn ... </search_result>        mask 0 (the environment wrote it)
    Ada Brun was born in Lorn. </think> \\boxed{Lorn}                     mask 1

Environments (env_cfg.env):
  real        SearchEnv from tools.py: queries -> observation strings (the <search_result> tags included);
  worldmodel  a callable with the same interface and `simulated = True` (worldmodel.py): a separate LM writes it;
  policy      environment=None: the policy writes its own observation (the paper's RL-1, its internal world
              model). The loop appends the observation opener, the policy generates until the observation closer
              (or obs_max_tokens, then the closer is forced); those tokens get mask 0 and count as sim_calls.
              With env_cfg.sim_greedy it writes them greedily (argmax) while its own tokens are sampled: they are
              the environment's, never trained on, and sampling them only blurs what the simulator knows.

A sequence ends at EOS ("eos"), at the closing brace of its \\boxed{} answer after </think> ("answer"), at
env_cfg.max_new_tokens completion tokens, observations included ("length"), or when it writes one action more
than env_cfg.max_actions: that action is not run, the loop appends NOTE and tools.answer_text's opener
(" I have searched enough. </think> \\boxed{") and the model writes the answer ("max_actions"; the paper's
Algorithm 1 forces an answer the same way).
With env_cfg.limit_observation set (and max_actions above 0: 0 is closed-book), such an action is not run either,
but it gets that text as its observation (tags included, mask 0; the paper's code: "Reach the limit of search
times.") and the model goes on: it must answer, and the length budget still ends it.

The KV cache (RowCache). One buffer per layer, keys and values of shape (B, H_kv, T, D). Row b's tokens sit
contiguously at columns 0 .. length[b]-1: prompts are *right*-padded at prefill, and every later chunk is
written at each row's own length, so a row has no holes and its position ids are simply its column indices.
A forward feeds a chunk of n rows x w columns: row i's pending tokens right-padded to w. Padding writes land
past the row's end, where the 4D mask (query column >= key column, per row) hides them and the next real token
overwrites them. Why not HF's left-padded DynamicCache: there every chunk has the same width for all rows, so
a decoding row would carry w-1 masked holes each time another row takes an observation, and only the whole
batch can be fed at once; here an observation is prefilled for the paused rows alone (a gathered sub-batch)
while the others decode, and no compaction is ever needed. Finished rows are dropped from the buffer.

Static decode (env.static_decode, off by default; StaticDecoder). The same loop, but the cache is allocated once
at (rows, longest prompt + max_new_tokens + 1) and kept per model across calls, and a one-token step runs at a
fixed shape (a batch-size bucket, the key length rounded up), so on cuda it is captured once as a CUDA graph and
replayed; on CPU the same step runs eagerly. Finished rows stay in the batch, masked, until the live rows fit a
smaller bucket. Chunks (prompts, observations) stay eager. The ids are the eager path's (tests/test_rollout.py).

Each step: 1) feed every live row its pending ids (decoding rows: the token sampled last step; rows coming back
from the tool: that token, i.e. the model's own action-closing token, then the observation ids), decoding rows
and chunk rows as two forwards; 2) sample one token per row from the logits after its last fed token;
3) check the stops on the newly written text (a short tail is decoded only when the new token can end a tag);
4) run the tool once for all rows that just closed an action and queue the observation ids.
Observations are tokenized once with tokenizer.encode(obs, add_special_tokens=False); earlier ids are never
decoded and re-encoded, so the mask comes from who wrote each token, never from matching strings.

logps: log-softmax of the model's logits divided by the sampling temperature, at the chosen token (before top-p;
greedy: temperature 1), 0.0 where mask==0; exactly what a training forward over (prompt + ids) recomputes at that
temperature (rl.token_logps), and the sampling log-prob itself when top_p is 1. Sampling is reproducible given a
torch.Generator (same rows, same settings).

Not here: the tool itself and observation formatting (tools.py), the world model (worldmodel.py), rewards (the
caller fills Episode.reward). Supported models: HF causal LMs whose decoder takes a 4D float mask and explicit
position_ids and calls `past_key_values.update(k, v, layer_idx)` (Qwen2, Llama/SmolLM2, Mistral, ...); no
sliding-window layers, logit soft-capping or encoder-decoders.

    python -m pytest -q tests/test_rollout.py
    python bench/rollout.py                     # tokens/s against HF generate re-prefill and the plain floor
"""
import functools
import weakref
from dataclasses import dataclass, field

import torch

from tools import FailureLimit, ToolError, answer_text, build_prompt, extract_boxed, failed_observation, loss_mask
from tools import observation_text

NOTE = " I have searched enough."  # then tools.answer_text: appended when the action limit is hit


@dataclass
class Episode:
    question: str
    golds: list  # gold answers
    prompt_ids: list  # the prompt, tokenized once (encode_prompt)
    ids: list = field(default_factory=list)  # completion ids: model and environment tokens in order
    mask: list = field(default_factory=list)  # 1 = the model wrote it (trained on), 0 = the environment (loss_mask)
    logps: list = field(default_factory=list)  # log-prob of each completion token when sampled; 0.0 where mask==0
    actions: list = field(default_factory=list)  # queries sent to the environment, in order
    real_calls: int = 0  # calls answered by the real tool
    sim_calls: int = 0  # calls answered by a world model or by the policy itself
    finish: str = ""  # answer | eos | length | max_actions (generate(): eos | length | stop)
    text: str = ""  # decoded completion
    reward: float = 0.0  # filled by the caller
    row: dict = None  # the question row it came from (id, kind, needs_search, ...)


def encode_prompt(tokenizer, question, env_cfg):
    """The prompt ids every stage uses for a question (tools.build_prompt, no extra special tokens)."""
    return tokenizer.encode(build_prompt(tokenizer, question, env_cfg), add_special_tokens=False)


# -----------------------------------------------------------------------------
# Sampling

def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """One token per row from logits (n, V): greedy at temperature 0, else temperature + top-p (nucleus).

    Returns (tokens (n,), logps (n,)), logps from log_softmax(logits / temperature), before top-p, as verl records
    them (greedy: temperature 1's): what rl.token_logps recomputes at the same temperature. At temperature 1 the
    division is skipped, so the numbers stay bit for bit those of an untempered log-softmax.
    """
    logits = logits.float()
    tempered = logits / temperature if temperature > 0 and temperature != 1 else logits
    logp_all = torch.log_softmax(tempered, dim=-1)
    if temperature <= 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(tempered, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest head with mass >= top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        where = generator.device if generator is not None else probs.device
        tokens = torch.multinomial(probs.to(where), 1, generator=generator).squeeze(-1).to(logits.device)
    return tokens, logp_all.gather(-1, tokens[:, None]).squeeze(-1)


# -----------------------------------------------------------------------------
# The KV cache: per-row contiguous columns, right padding, a sub-batch can be fed alone

class RowCache:
    """Keys/values per layer, (B, H_kv, T, D), row b real at columns [0, length[b]).

    The model calls update(k, v, layer_idx) once per layer; before each forward `bind` says which rows are fed
    (None = all rows) and at which columns (n, w) their w new tokens go; it returns the columns and the key length
    the mask must cover (StaticCache may cut them).
    """

    def __init__(self, batch_size, capacity, device):
        self.keys, self.values = [], []
        self.batch_size, self.capacity, self.device = batch_size, capacity, device
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row

    def bind(self, rows, cols, kv_len):
        self.rows, self.cols, self.kv_len = rows, cols, kv_len
        all_rows = torch.arange(self.batch_size, device=self.device)
        self.write_rows = (all_rows if rows is None else rows)[:, None]  # (n, 1), broadcast against cols (n, w)
        if kv_len > self.capacity:  # grow: double, copy the filled part once
            self.capacity = max(kv_len, 2 * self.capacity)
            for buffers in (self.keys, self.values):
                for i, old in enumerate(buffers):
                    new = old.new_zeros(old.shape[0], old.shape[1], self.capacity, old.shape[3])
                    new[:, :, :old.shape[2]] = old
                    buffers[i] = new
        return cols, kv_len

    def update(self, key, value, layer_idx, *args, **kwargs):
        """Write the new (n, H, w, D) keys/values at (rows, cols); return this sub-batch's keys/values so far."""
        if layer_idx == len(self.keys):  # first forward: allocate with the model's own head shapes and dtype
            shape = (self.batch_size, key.shape[1], self.capacity, key.shape[3])
            self.keys.append(key.new_zeros(shape))
            self.values.append(value.new_zeros(shape))
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        k_buf[self.write_rows, :, self.cols] = key.transpose(1, 2).to(k_buf.dtype)  # (n, w, H, D) at (row, col)
        v_buf[self.write_rows, :, self.cols] = value.transpose(1, 2).to(v_buf.dtype)
        if self.rows is None:
            return k_buf[:, :, :self.kv_len], v_buf[:, :, :self.kv_len]  # a view: no copy for the full batch
        return k_buf[self.rows, :, :self.kv_len], v_buf[self.rows, :, :self.kv_len]

    def keep(self, rows):
        """Drop every row not in `rows` (finished sequences), so later full-batch steps need no gather."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.length = self.length[rows]
        self.batch_size = len(rows)

    # read by some HF code paths; the 4D mask we pass makes them unnecessary for Qwen2/Llama
    def get_seq_length(self, layer_idx=0):
        return int(self.length.max()) if self.batch_size else 0


def forward_chunk(model, cache, rows, feeds, pad_id):
    """Feed each cache row in `rows` (None = all) its list of pending ids in one forward.

    The chunk is right-padded to w; row i's token j goes to column length[i] + j with position id equal to that
    column, and attends to columns <= its own. Returns the logits after each row's last fed token, (n, V).
    """
    if model.config._attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"rollout needs sdpa or eager attention (a 4D mask), not {model.config._attn_implementation}")
    device = cache.device
    n, w = len(feeds), max(len(f) for f in feeds)
    ids = torch.tensor([f + [pad_id] * (w - len(f)) for f in feeds], device=device)
    n_new = torch.tensor([len(f) for f in feeds], device=device)
    start = cache.length if rows is None else cache.length[rows]
    cols = start[:, None] + torch.arange(w, device=device)  # (n, w) absolute columns = position ids
    cols, kv_len = cache.bind(rows, cols, int(start.max()) + w)
    dtype = next(model.parameters()).dtype
    visible = torch.arange(kv_len, device=device)[None, None, :] <= cols[:, :, None]  # (n, w, kv) causal per row
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, torch.finfo(dtype).min)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask[:, None], position_ids=cols,
                                 past_key_values=cache, use_cache=True).last_hidden_state  # (n, w, hidden)
    last = hidden[torch.arange(n, device=device), n_new - 1]  # only the rows' last positions reach the LM head
    if rows is None:
        cache.length += n_new
    else:
        cache.length[rows] += n_new
    return model.get_output_embeddings()(last).float()


# -----------------------------------------------------------------------------
# Static decode (env.static_decode): one preallocated cache, a fixed-shape decode step, a CUDA graph on cuda

BUCKETS = [1, 2, 4, 8] + list(range(16, 513, 16))  # decode batch sizes, one graph each (nano-vllm's buckets)
KV_STEP = 256  # the step attends over the first kv columns, kv a multiple of this: not always the whole capacity
CUDA_GRAPHS = True  # False: the static step runs eagerly on cuda too (what the graph buys, for bench/rollout.py)


def bucket(n):
    return next((b for b in BUCKETS if b >= n), -(-n // 16) * 16)


class StaticCache(RowCache):
    """A RowCache allocated once at (batch_size, capacity) that never grows or moves: a captured graph holds its
    addresses. `used` rows are the current call's (the cache outlives a call); `step` = (b, kv) while the
    decode step runs, else None (a chunk, RowCache's path)."""

    def __init__(self, model, batch_size, capacity):
        param = next(model.parameters())
        super().__init__(batch_size, capacity, param.device)
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (batch_size, cfg.num_key_value_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.used, self.step = batch_size, None

    def bind(self, rows, cols, kv_len):
        if kv_len > self.capacity:  # only padding reaches past the end: it all lands in the last column, never real
            cols, kv_len = cols.clamp(max=self.capacity - 1), self.capacity
        return super().bind(rows, cols, kv_len)

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.step is None:
            return super().update(key, value, layer_idx)
        b, kv = self.step
        k_buf, v_buf = self.keys[layer_idx][:b], self.values[layer_idx][:b]
        col = self.length[:b].view(b, 1, 1, 1).expand_as(key)  # each row's first free column
        k_buf.scatter_(2, col, key.to(k_buf.dtype))
        v_buf.scatter_(2, col, value.to(v_buf.dtype))
        return k_buf[:, :, :kv], v_buf[:, :, :kv]

    def keep(self, rows):
        """Move `rows` to the first slots, in place (gather, then copy)."""
        n = len(rows)
        for buf in self.keys + self.values:
            buf[:n] = buf[rows]
        self.length[:n] = self.length[rows]
        self.used = n


class StaticDecoder:
    """The decode step with static shapes, for a GPU where an eager step is bound by launches and Python rather
    than by reading the weights (issue 14 measured an eager step at many times one read of the weights on an H200:
    docs/benchmarks.md, bench/rollout.py).
    A CUDA graph records the kernels of one step and replays them with a single launch; that needs every tensor
    the step touches to keep its address and shape, hence the preallocated StaticCache and persistent buffers.

    Captured, once per (b, kv) on first use: the decoder forward of one token for each of the first b cache rows
    (b from BUCKETS), reading `ids` and the row lengths (= position ids), building the mask from them, writing
    keys/values with a scatter at each row's own column, attending over columns [0, kv). On CPU the same
    `forward` runs eagerly, so the tests can hold its ids against the eager path's.
    Not captured: the LM head (one matmul, fed only the decoding rows; outside, so a wrapper around it sees each
    step), sampling (sample() as in the eager path, so a torch.Generator works as there) and the stop checks
    (Python, after the one host sync per step: the sampled ids). Prompts and observations go through
    forward_chunk eagerly, for the paused rows only, into the same buffers.
    Rows in the bucket that do not decode this step (finished, or taking a chunk) run anyway: their write lands
    at their first free column, past their end, where the mask hides it and their next real token overwrites it.
    Finished rows are compacted away (StaticCache.keep) only when the live rows fit a smaller bucket.
    The decoder is kept per model across calls (capturing costs a few forwards) while its parameters stay where
    they are: in-place optimizer updates are fine, the graph reads the new values.
    """

    def __init__(self, model, batch_size, capacity, params):
        self.params, self.decoder = params, model.get_decoder()  # the decoder only: no reference to the model
        self.cache = StaticCache(model, batch_size, capacity)
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.cache.device)
        self.columns = torch.arange(capacity, device=self.cache.device)
        self.graphs = {}  # (b, kv) -> (CUDAGraph, its output: the last hidden states (b, hidden))

    def forward(self, b, kv):
        cache = self.cache
        pos = cache.length[:b, None]  # (b, 1): the column each row writes is its position id
        dtype = cache.keys[0].dtype
        mask = torch.zeros(b, kv, dtype=dtype, device=cache.device)
        mask.masked_fill_(self.columns[None, :kv] > pos, torch.finfo(dtype).min)
        cache.step = (b, kv)
        try:
            hidden = self.decoder(input_ids=self.ids[:b], attention_mask=mask[:, None, None], position_ids=pos,
                                  past_key_values=cache, use_cache=True).last_hidden_state
        finally:
            cache.step = None
        return hidden[:, 0]

    def capture(self, b, kv):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the graph (lazy initialisation, cuBLAS workspaces)
            self.forward(b, kv)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            hidden = self.forward(b, kv)
        return graph, hidden

    def step(self, model, slots, tokens, kv_len):
        """Feed cache row slots[i] the token tokens[i]; kv_len: the most columns a fed row sees. Returns (n, V)."""
        cache = self.cache
        b = min(bucket(cache.used), cache.batch_size)
        kv = min(cache.capacity, -(-kv_len // KV_STEP) * KV_STEP)
        fed = torch.tensor([slots, tokens], device=cache.device)  # one host-to-device copy
        self.ids[fed[0], 0] = fed[1]
        if cache.device.type == "cuda" and CUDA_GRAPHS:
            if (b, kv) not in self.graphs:
                self.graphs[b, kv] = self.capture(b, kv)
            graph, hidden = self.graphs[b, kv]
            graph.replay()
        else:
            hidden = self.forward(b, kv)
        cache.length[fed[0]] += 1
        return model.get_output_embeddings()(hidden[fed[0]]).float()


_DECODERS = weakref.WeakKeyDictionary()  # model -> its StaticDecoder


def static_decoder(model, batch_size, capacity):
    """The model's StaticDecoder for a call of batch_size rows, reused if it is big enough and the weights have not
    moved, else a new one (the old buffers and graphs are freed first)."""
    params = tuple(p.data_ptr() for p in model.parameters())
    old = _DECODERS.pop(model, None)
    if old is None or old.params != params or old.cache.batch_size < batch_size or old.cache.capacity < capacity:
        size = (batch_size, capacity) if old is None else (max(batch_size, old.cache.batch_size),
                                                             max(capacity, old.cache.capacity))
        old = None
        decoder = StaticDecoder(model, *size, params)
    else:
        decoder = old
    decoder.cache.length.zero_()
    decoder.cache.used = batch_size
    _DECODERS[model] = decoder
    return decoder


# -----------------------------------------------------------------------------
# Watching the text for tags: a short tail is decoded only when the new token can end one

@functools.lru_cache(maxsize=8)
def _may_end(tokenizer, last_chars):
    """For every vocabulary id: does its text contain one of last_chars? (built once per tokenizer)"""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    texts = [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in vocab]
    return [any(c in t for c in last_chars) for t in texts]


class Tags:
    """Detects that the token just written completed one of the watched strings (tags may be several tokens)."""

    def __init__(self, tokenizer, watched):
        watched = [s for s in watched if s]
        self.tokenizer = tokenizer
        self.may_end = _may_end(tokenizer, "".join(sorted({s[-1] for s in watched})))
        self.longest = max([len(tokenizer.encode(s, add_special_tokens=False)) for s in watched] + [1]) + 2

    def can_end(self, token):
        return token < len(self.may_end) and self.may_end[token]  # ids past the tokenizer (padded vocab): no

    def just_wrote(self, ids, start, tag):
        """Did the last id of ids[start:] complete `tag`? Decodes a tail of a few tokens, twice."""
        tail = ids[max(start, len(ids) - self.longest - 1):]
        return tag in self.tokenizer.decode(tail) and tag not in self.tokenizer.decode(tail[:-1])


# -----------------------------------------------------------------------------
# The engine shared by rollout() and generate(): prefill, then feed / sample / check / act until all rows are done

@dataclass
class Row:
    episode: Episode
    feed: list  # ids to feed at the next forward (the last sampled token, then any environment ids)
    slot: int = 0  # this row's index in the cache
    start: int = 0  # index in ids where the model's current stretch of writing began (after the last env chunk)
    answer_from: int = -1  # index in ids after </think> (or the note); -1 while still thinking
    in_obs: int = -1  # policy env: index in ids where the self-written observation began; -1 otherwise
    forced: bool = False  # the action limit forced the answer
    done: bool = False


def run_loop(model, tokenizer, episodes, rules, temperature, top_p, generator, static=False):
    """Fill every episode's ids/mask/logps. rules.after_token(row, token) -> True when the row must act;
    rules.act(rows) queues what the environment writes (row.feed, and ids with mask 0).
    static: one-token steps go through the StaticDecoder (same ids; see its docstring)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    greedy_obs = getattr(getattr(rules, "env", None), "sim_greedy", False)
    if any(len(ep.prompt_ids) == 0 for ep in episodes):
        raise ValueError("rollout: every prompt needs at least one token")
    live = [Row(episode=ep, feed=list(ep.prompt_ids), slot=i) for i, ep in enumerate(episodes)]  # in slot order
    longest = max(len(ep.prompt_ids) for ep in episodes)
    if static:  # room for every token a row can feed (prompt + max_new - 1) and one spare column for padding
        decoder = static_decoder(model, len(live), longest + rules.max_new + 1)
        cache = decoder.cache
    else:
        cache = RowCache(len(live), longest + 64, device)
    while live:
        # 1) feed: decoding rows (one pending token) and chunk rows (prompt, or token + observation) apart, so
        #    an observation is prefilled for the paused rows only
        acting = []
        for group in (g for g in ([r for r in live if len(r.feed) == 1], [r for r in live if len(r.feed) > 1]) if g):
            if static and len(group[0].feed) == 1:
                logits = decoder.step(model, [r.slot for r in group], [r.feed[0] for r in group],
                                      max(len(r.episode.prompt_ids) + len(r.episode.ids) for r in group))
            else:
                rows = None if len(group) == cache.batch_size else torch.tensor([r.slot for r in group], device=device)
                logits = forward_chunk(model, cache, rows, [r.feed for r in group], pad_id)
            # 2) sample one token per row
            tokens, logps = sample(logits, temperature, top_p, generator)
            if greedy_obs and any(r.in_obs >= 0 for r in group):  # self-written observations: the likeliest token
                in_obs = torch.tensor([r.in_obs >= 0 for r in group], device=tokens.device)
                tokens = torch.where(in_obs, logits.argmax(-1), tokens)
            for row, token, logp in zip(group, tokens.tolist(), logps.tolist()):
                ep, own = row.episode, row.in_obs < 0  # a self-written observation is the environment's
                ep.ids.append(token)
                ep.mask += loss_mask("model" if own else "env", 1)
                ep.logps.append(logp if own else 0.0)
                row.feed = [token]
                # 3) stops and actions, from the token just written
                if rules.after_token(row, token):
                    acting.append(row)
        # 4) the environment, once for all rows that just acted
        if acting:
            rules.act(acting)
        if any(r.done for r in live):  # drop finished rows from the cache: later steps stay full-batch views
            live = [r for r in live if not r.done]
            if live and (not static or bucket(len(live)) < bucket(cache.used)):  # static: only for a smaller bucket
                cache.keep(torch.tensor([r.slot for r in live], device=device))
                for i, r in enumerate(live):
                    r.slot = i


# -----------------------------------------------------------------------------
# The CoA rules: actions, observations, the action limit, the answer

def query_of(tokenizer, ep, start, env_cfg):
    """The query of the action the model just closed: the text between the last action tags of its stretch; None
    when the closer has no opener before it (then it is no action: nothing is searched)."""
    text = tokenizer.decode(ep.ids[start:])
    before, opened, query = text[:text.rfind(env_cfg.action_close)].rpartition(env_cfg.action_open)
    return query.strip() if opened else None


def count_calls(ep, environment, n=1):
    """Count n calls on an Episode (or eval's Trace): a world model's (`simulated = True`) or the real tool's."""
    if getattr(environment, "simulated", False):
        ep.sim_calls += n
    else:
        ep.real_calls += n


def call_environment(environment, episodes, tokenizer, env_cfg):
    """Observation strings for the episodes' last actions (each sees its trajectory so far as its context), the
    calls counted; a failing or malformed environment gives the failed observation (as SearchEnv does for its
    tool) unless env.on_error=raise."""
    queries = [ep.actions[-1] for ep in episodes]
    contexts = [tokenizer.decode(ep.prompt_ids + ep.ids) for ep in episodes]
    try:
        obs = environment(queries, contexts)
        if not isinstance(obs, (list, tuple)) or len(obs) != len(queries) or not all(isinstance(o, str) for o in obs):
            raise ToolError(f"environment returned {type(obs).__name__}, expected a list of {len(queries)} strings")
        obs = list(obs)
    except FailureLimit:
        raise  # too many failed calls for the run: it stops, whatever on_error says
    except Exception as e:
        if env_cfg.on_error == "raise":
            if isinstance(e, ToolError):
                raise  # as it is: `raise e from e` would make it its own cause
            raise ToolError(f"{type(e).__name__}: {e}") from e
        obs = [failed_observation(type(e).__name__, env_cfg)] * len(queries)
    for ep in episodes:
        count_calls(ep, environment)
    return obs


def observation_ids(tokenizer, obs, env_cfg, open_ids, close_ids):
    """An observation tokenized once, under the budget obs_max_tokens (+ its tags); the closer is kept."""
    ids = tokenizer.encode(obs, add_special_tokens=False)
    cap = env_cfg.obs_max_tokens + len(open_ids) + len(close_ids) + 8
    return ids if len(ids) <= cap else ids[:cap - len(close_ids)] + close_ids


def finish(row, why):
    """End a row (Episode.finish says why); False, so an after_token can `return finish(...)`: no action."""
    row.episode.finish, row.done = why, True
    return False


class CoARules:
    """What happens after each token of a CoA trajectory (see the module docstring)."""

    def __init__(self, tokenizer, env_cfg, environment, max_new):
        self.tok, self.env, self.environment, self.max_new = tokenizer, env_cfg, environment, max_new
        self.tags = Tags(tokenizer, [env_cfg.action_close, env_cfg.think_close, env_cfg.obs_close, "}"])
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        self.note_ids = encode(NOTE + answer_text(env_cfg))
        self.obs_open_ids, self.obs_close_ids = encode(env_cfg.obs_open), encode(env_cfg.obs_close)
        # max_actions=0 is closed-book (the no-tool baseline, the knowledge probe): no observation at all, the answer
        # is forced whatever limit_observation says
        limit = env_cfg.limit_observation.strip() if env_cfg.max_actions else ""
        self.limit_ids = encode(observation_text(limit, env_cfg)) if limit else []

    def after_token(self, row, token):
        """Stops, and True when the row just closed an action."""
        ep, env, tags = row.episode, self.env, self.tags
        if token == self.tok.eos_token_id:
            return finish(row, "eos")
        if len(ep.ids) >= self.max_new:
            return finish(row, "length")
        if row.in_obs >= 0:  # policy env: the policy is writing its own observation
            if tags.can_end(token) and tags.just_wrote(ep.ids, row.in_obs, env.obs_close):
                row.in_obs, row.start = -1, len(ep.ids)
            elif len(ep.ids) - row.in_obs >= env.obs_max_tokens + len(self.obs_open_ids):  # over budget: close it
                row.in_obs = -1
                self.add_env(row, self.obs_close_ids)
                row.start = len(ep.ids)
            return False
        if not tags.can_end(token):
            return False
        if row.answer_from >= 0:  # after </think>: the answer ends with the brace that closes \boxed{
            if extract_boxed(self.tok.decode(ep.ids[row.answer_from:]), env.answer_open) is not None:
                return finish(row, "max_actions" if row.forced else "answer")
            return False
        if tags.just_wrote(ep.ids, row.start, env.think_close):
            row.answer_from = len(ep.ids)
            return False
        return tags.just_wrote(ep.ids, row.start, env.action_close)

    def act(self, rows):
        """Run the environment once for every row that just closed an action; queue the observations."""
        calls = []
        for row in rows:
            ep = row.episode
            query = query_of(self.tok, ep, row.start, self.env)
            if query is None:  # a closer with no opener: no search (tools.parse calls it unbalanced action tags)
                continue
            if len(ep.actions) >= self.env.max_actions and self.limit_ids:  # not run: the limit is its observation
                self.add_env(row, self.limit_ids)
                row.start = len(ep.ids)
                continue
            if len(ep.actions) >= self.env.max_actions:  # one action too many: not run, the answer is forced
                row.forced, row.answer_from = True, len(ep.ids)
                self.add_env(row, self.note_ids)
                continue
            ep.actions.append(query)
            if self.environment is None:  # env=policy: open the observation, the policy writes the rest
                ep.sim_calls += 1
                row.in_obs = len(ep.ids)
                self.add_env(row, self.obs_open_ids)
            else:
                calls.append(row)
        if not calls:
            return
        for row, obs in zip(calls, call_environment(self.environment, [r.episode for r in calls], self.tok, self.env)):
            self.add_env(row, observation_ids(self.tok, obs, self.env, self.obs_open_ids, self.obs_close_ids))
            row.start = len(row.episode.ids)

    def add_env(self, row, ids):
        """Environment ids (tools.loss_mask: 0) go after the pending token, cut to the length budget."""
        ep = row.episode
        ids = ids[:self.max_new - len(ep.ids)]
        ep.ids += ids
        ep.mask += loss_mask("env", len(ids))
        ep.logps += [0.0] * len(ids)
        row.feed += ids
        if len(ep.ids) >= self.max_new:
            finish(row, "length")


def truncation_warning(share, env, where):
    """One line when more than env.truncation_warn of the trajectories stopped at the length budget, else ""."""
    if share <= env.truncation_warn:
        return ""
    return (f"{where}: warning: {share:.0%} of trajectories stopped at env.max_new_tokens={env.max_new_tokens} "
            f"(observations included), more than env.truncation_warn={env.truncation_warn:g}: raise max_new_tokens")


@torch.no_grad()
def rollout(model, tokenizer, rows, env_cfg, environment, group_size=1, temperature=0.0, top_p=1.0,
            max_new_tokens=None, generator=None):
    """Sample group_size trajectories per question row (group members adjacent); see the module docstring.

    rows: question dicts with at least "question" (and "golden_answers"); environment: SearchEnv, a world
    model with the same interface, or None with env_cfg.env == "policy". Returns len(rows) * group_size Episodes.
    """
    if env_cfg.env == "policy":
        environment = None
    elif environment is None:
        raise ValueError(f"rollout: env.env={env_cfg.env!r} needs an environment (SearchEnv or a world model)")
    episodes = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ValueError(f"rollout: row {n} has no question text: {str(row)[:200]}")
        prompt_ids = encode_prompt(tokenizer, row["question"], env_cfg)
        episodes += [Episode(question=row["question"], golds=list(row.get("golden_answers") or []),
                             prompt_ids=list(prompt_ids), row=row) for _ in range(group_size)]
    if not episodes:
        return []
    rules = CoARules(tokenizer, env_cfg, environment, max_new_tokens or env_cfg.max_new_tokens)
    run_loop(model, tokenizer, episodes, rules, temperature, top_p, generator, static=env_cfg.static_decode)
    for ep in episodes:
        ep.text = tokenizer.decode(ep.ids)
    return episodes


# -----------------------------------------------------------------------------
# Plain generation: no tools, stop strings

class StopRules:
    def __init__(self, tokenizer, max_new_tokens, stop_strings):
        self.tok, self.max_new = tokenizer, max_new_tokens
        self.stop_strings = [s for s in stop_strings if s]
        self.tags = Tags(tokenizer, self.stop_strings)

    def after_token(self, row, token):
        ep = row.episode
        if token == self.tok.eos_token_id:
            return finish(row, "eos")
        if len(ep.ids) >= self.max_new:
            return finish(row, "length")
        if self.stop_strings and self.tags.can_end(token) and \
                any(self.tags.just_wrote(ep.ids, 0, s) for s in self.stop_strings):
            return finish(row, "stop")
        return False


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, max_new_tokens, stop_strings=(), temperature=0.0, top_p=1.0,
             generator=None, static_decode=False):
    """Plain batched KV-cached generation, no tools: for world-model observations and workflow baselines.

    prompt_ids: list of id lists (ragged is fine). Each sequence stops at EOS (kept), after the token that
    completes one of stop_strings (kept), or at max_new_tokens. Returns (ids, logps): two lists with one list
    per sequence, logps the chosen tokens' log-probs at the sampling temperature (sample()). static_decode: as
    env.static_decode.
    """
    episodes = [Episode(question="", golds=[], prompt_ids=list(p)) for p in prompt_ids]
    if max_new_tokens <= 0 or not episodes:
        return [[] for _ in episodes], [[] for _ in episodes]
    run_loop(model, tokenizer, episodes, StopRules(tokenizer, max_new_tokens, stop_strings),
             temperature, top_p, generator, static=static_decode)
    return [ep.ids for ep in episodes], [ep.logps for ep in episodes]


if __name__ == "__main__":  # a library: `python rollout.py --help` says so and where its command lines are
    import sys
    print(__doc__.strip().split("\n\n")[0] + "\n\nrollout.py is a library, with no command line of its own: "
          "python chat.py asks a trained model a question through it, and bench/rollout.py measures it.")
    sys.exit(0 if sys.argv[1:] in ([], ["--help"], ["-h"]) else 2)
