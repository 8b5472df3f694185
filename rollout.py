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

A sequence ends at EOS ("eos"), at the closing brace of its \\boxed{} answer after </think> ("answer"), at
env_cfg.max_new_tokens completion tokens, observations included ("length"), or when it writes one action more
than env_cfg.max_actions: that action is not run, the loop appends NOTE (" I have searched enough. </think>
\\boxed{") and the model writes the answer ("max_actions"; the paper's Algorithm 1 forces an answer the same way).

The KV cache (RowCache). One buffer per layer, keys and values of shape (B, H_kv, T, D). Row b's tokens sit
contiguously at columns 0 .. length[b]-1: prompts are *right*-padded at prefill, and every later chunk is
written at each row's own length, so a row has no holes and its position ids are simply its column indices.
A forward feeds a chunk of n rows x w columns: row i's pending tokens right-padded to w. Padding writes land
past the row's end, where the 4D mask (query column >= key column, per row) hides them and the next real token
overwrites them. Why not HF's left-padded DynamicCache: there every chunk has the same width for all rows, so
a decoding row would carry w-1 masked holes each time another row takes an observation, and only the whole
batch can be fed at once; here an observation is prefilled for the paused rows alone (a gathered sub-batch)
while the others decode, and no compaction is ever needed. Finished rows are dropped from the buffer.

Each step: 1) feed every live row its pending ids (decoding rows: the token sampled last step; rows coming back
from the tool: that token, i.e. the model's own action-closing token, then the observation ids), decoding rows
and chunk rows as two forwards; 2) sample one token per row from the logits after its last fed token;
3) check the stops on the newly written text (a short tail is decoded only when the new token can end a tag);
4) run the tool once for all rows that just closed an action and queue the observation ids.
Observations are tokenized once with tokenizer.encode(obs, add_special_tokens=False); earlier ids are never
decoded and re-encoded, so the mask comes from who wrote each token, never from matching strings.

logps: log-softmax of the model's logits at the chosen token (temperature 1, before top-p), 0.0 where mask==0;
exactly what a training forward over (prompt + ids) recomputes, and the sampling log-prob when rl samples at
temperature 1, top_p 1. Sampling is reproducible given a torch.Generator (same rows, same settings).

Not here: the tool itself and observation formatting (tools.py), the world model (worldmodel.py), rewards (the
caller fills Episode.reward). Supported models: HF causal LMs whose decoder takes a 4D float mask and explicit
position_ids and calls `past_key_values.update(k, v, layer_idx)` (Qwen2, Llama/SmolLM2, Mistral, ...); no
sliding-window layers, logit soft-capping or encoder-decoders.

    python -m pytest -q tests/test_rollout.py
    python bench/rollout.py                     # tokens/s against HF generate re-prefill and the plain floor
"""
from dataclasses import dataclass, field

import torch

from tools import ToolError, build_prompt

NOTE = " I have searched enough. {think_close} {answer_open}"  # appended when the action limit is hit


@dataclass
class Episode:
    question: str
    golds: list  # gold answers
    prompt_ids: list  # the prompt, tokenized once (encode_prompt)
    ids: list = field(default_factory=list)  # completion ids: model and environment tokens in order
    mask: list = field(default_factory=list)  # 1 = the model wrote it (trained on), 0 = the environment wrote it
    logps: list = field(default_factory=list)  # log-prob of each completion token when sampled; 0.0 where mask==0
    actions: list = field(default_factory=list)  # queries sent to the environment, in order
    real_calls: int = 0  # calls answered by the real tool
    sim_calls: int = 0  # calls answered by a world model or by the policy itself
    finish: str = ""  # answer | eos | length | max_actions
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

    Returns (tokens (n,), logps (n,)), logps from the untempered log-softmax (what training recomputes).
    """
    logits = logits.float()
    logp_all = torch.log_softmax(logits, dim=-1)
    if temperature <= 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
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
    (None = all rows) and at which columns (n, w) their w new tokens go.
    """

    def __init__(self, batch_size, capacity, device):
        self.keys, self.values = [], []
        self.batch_size, self.capacity, self.device = batch_size, capacity, device
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row

    def bind(self, rows, cols, kv_len):
        self.rows, self.cols, self.kv_len = rows, cols, kv_len
        if kv_len > self.capacity:  # grow: double, copy the filled part once
            self.capacity = max(kv_len, 2 * self.capacity)
            for buffers in (self.keys, self.values):
                for i, old in enumerate(buffers):
                    new = old.new_zeros(old.shape[0], old.shape[1], self.capacity, old.shape[3])
                    new[:, :, :old.shape[2]] = old
                    buffers[i] = new

    def update(self, key, value, layer_idx, *args, **kwargs):
        """Write the new (n, H, w, D) keys/values at (rows, cols); return this sub-batch's keys/values so far."""
        if layer_idx == len(self.keys):  # first forward: allocate with the model's own head shapes and dtype
            shape = (self.batch_size, key.shape[1], self.capacity, key.shape[3])
            self.keys.append(key.new_zeros(shape))
            self.values.append(value.new_zeros(shape))
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        rows = self.rows if self.rows is not None else torch.arange(self.batch_size, device=self.device)
        k_buf[rows[:, None], :, self.cols] = key.transpose(1, 2).to(k_buf.dtype)  # (n, w, H, D) at (row, col)
        v_buf[rows[:, None], :, self.cols] = value.transpose(1, 2).to(v_buf.dtype)
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
    device = cache.device
    n, w = len(feeds), max(len(f) for f in feeds)
    ids = torch.tensor([f + [pad_id] * (w - len(f)) for f in feeds], device=device)
    n_new = torch.tensor([len(f) for f in feeds], device=device)
    start = cache.length if rows is None else cache.length[rows]
    cols = start[:, None] + torch.arange(w, device=device)  # (n, w) absolute columns = position ids
    kv_len = int(start.max()) + w
    cache.bind(rows, cols, kv_len)
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
# Per-row state and stop detection

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


class Tags:
    """The strings the loop watches for, their token ids, and which vocabulary ids could end one of them."""

    def __init__(self, tokenizer, env_cfg, watched):
        self.tokenizer = tokenizer
        watched = [s for s in watched if s]
        last_chars = {s[-1] for s in watched}
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        texts = [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in vocab]
        # a token can end a tag only if its text contains the tag's last character; only then is a tail decoded
        self.may_end = [any(c in t for c in last_chars) for t in texts]
        self.longest = max([len(tokenizer.encode(s, add_special_tokens=False)) for s in watched] + [1]) + 2
        self.note_ids = tokenizer.encode(NOTE.format(think_close=env_cfg.think_close,
                                                     answer_open=env_cfg.answer_open), add_special_tokens=False)
        self.obs_open_ids = tokenizer.encode(env_cfg.obs_open, add_special_tokens=False)
        self.obs_close_ids = tokenizer.encode(env_cfg.obs_close, add_special_tokens=False)

    def can_end(self, token):
        return token < len(self.may_end) and self.may_end[token]  # ids past the tokenizer (padded vocab): no

    def just_wrote(self, ids, start, tag):
        """Did the last id of ids[start:] complete `tag`? (decodes at most a short tail)"""
        tail = ids[max(start, len(ids) - self.longest - 1):]
        decode = self.tokenizer.decode
        return tag in decode(tail) and tag not in decode(tail[:-1])


def query_of(tokenizer, ep, start, env_cfg):
    """The query of the action that the model just closed: text between the last action tags of its stretch."""
    text = tokenizer.decode(ep.ids[start:])
    body = text[:text.rfind(env_cfg.action_close)]
    return body.rpartition(env_cfg.action_open)[2].strip()


def call_environment(environment, queries, contexts, env_cfg):
    """Observation strings for the queries; a tool exception becomes the failed observation (unless on_error=raise)."""
    try:
        obs = environment(queries, contexts)
        if not isinstance(obs, (list, tuple)) or len(obs) != len(queries) or not all(isinstance(o, str) for o in obs):
            raise ToolError(f"environment returned {type(obs).__name__}, expected {len(queries)} strings")
        return list(obs)
    except Exception as e:
        if env_cfg.on_error == "raise":
            raise e if isinstance(e, ToolError) else ToolError(str(e)) from e
        return [f"{env_cfg.obs_open} search failed: {type(e).__name__} {env_cfg.obs_close}"] * len(queries)


# -----------------------------------------------------------------------------
# The loop

@torch.no_grad()
def rollout(model, tokenizer, rows, env_cfg, environment, group_size=1, temperature=0.0, top_p=1.0,
            max_new_tokens=None, generator=None):
    """Sample group_size trajectories per question row (group members adjacent); see the module docstring."""
    if env_cfg.env == "policy":
        environment = None
    elif environment is None:
        raise ValueError(f"rollout: env.env={env_cfg.env!r} needs an environment (SearchEnv or world model)")
    max_new = max_new_tokens or env_cfg.max_new_tokens
    simulated = environment is None or bool(getattr(environment, "simulated", False))
    episodes = []
    for row in rows:
        prompt_ids = encode_prompt(tokenizer, row["question"], env_cfg)
        for _ in range(group_size):
            episodes.append(Episode(question=row["question"], golds=list(row.get("golden_answers", [])),
                                    prompt_ids=list(prompt_ids), row=row))
    tags = Tags(tokenizer, env_cfg, [env_cfg.action_close, env_cfg.think_close, env_cfg.obs_close, "}"])
    prompts = [ep.prompt_ids for ep in episodes]

    def on_token(state, token):
        """Stops and actions after the token just written; returns 'action' when the tool must run."""
        ep = state.episode
        if token == tokenizer.eos_token_id:
            return finish(state, "eos")
        if len(ep.ids) >= max_new:
            return finish(state, "length")
        if not tags.can_end(token):
            return None
        if state.in_obs >= 0:  # policy env: the policy is writing its own observation
            if tags.just_wrote(ep.ids, state.in_obs, env_cfg.obs_close):
                state.in_obs, state.start = -1, len(ep.ids)
            return None
        if state.answer_from >= 0:
            from tools import extract_boxed
            if extract_boxed(tokenizer.decode(ep.ids[state.answer_from:]), env_cfg.answer_open) is not None:
                return finish(state, "max_actions" if state.forced else "answer")
            return None
        if tags.just_wrote(ep.ids, state.start, env_cfg.think_close):
            state.answer_from = len(ep.ids)
        elif tags.just_wrote(ep.ids, state.start, env_cfg.action_close):
            return "action"
        return None

    def finish(state, why):
        state.episode.finish, state.done = why, True
        return None

    def env_tokens(state, ids):
        """Queue environment ids after the pending token, cut to the length budget."""
        ep = state.episode
        room = max_new - len(ep.ids)
        ids = ids[:room]
        ep.ids += ids
        ep.mask += [0] * len(ids)
        ep.logps += [0.0] * len(ids)
        state.feed += ids
        if len(ep.ids) >= max_new:
            finish(state, "length")

    def act(states):
        """Run the tool once for every row that just closed an action; queue the observations."""
        calls, queries = [], []
        for state in states:
            ep = state.episode
            if len(ep.actions) >= env_cfg.max_actions:  # one action too many: not run, the answer is forced
                state.forced = True
                state.answer_from = len(ep.ids)
                env_tokens(state, tags.note_ids)
                continue
            query = query_of(tokenizer, ep, state.start, env_cfg)
            ep.actions.append(query)
            if environment is None:  # the policy writes the observation itself
                ep.sim_calls += 1
                state.in_obs = len(ep.ids)
                env_tokens(state, tags.obs_open_ids)
            else:
                calls.append(state)
                queries.append(query)
        if calls:
            contexts = [tokenizer.decode(s.episode.prompt_ids + s.episode.ids) for s in calls]
            observations = call_environment(environment, queries, contexts, env_cfg)
            for state, obs in zip(calls, observations):
                ep = state.episode
                if simulated:
                    ep.sim_calls += 1
                else:
                    ep.real_calls += 1
                env_tokens(state, obs_ids(obs))
                state.start = len(ep.ids)

    def obs_ids(obs):
        """An observation tokenized once, under the budget obs_max_tokens (+ its tags); the closer is kept."""
        ids = tokenizer.encode(obs, add_special_tokens=False)
        cap = env_cfg.obs_max_tokens + len(tags.obs_open_ids) + len(tags.obs_close_ids) + 8
        return ids if len(ids) <= cap else ids[:cap - len(tags.obs_close_ids)] + tags.obs_close_ids

    def after_policy_obs_budget(state):
        # policy env: a self-written observation longer than the budget is closed by the loop
        ep = state.episode
        if state.in_obs >= 0 and len(ep.ids) - state.in_obs >= env_cfg.obs_max_tokens + len(tags.obs_open_ids):
            state.in_obs = -1
            env_tokens(state, tags.obs_close_ids)
            state.start = len(ep.ids)

    run_loop(model, tokenizer, prompts, episodes, on_token, act, after_policy_obs_budget,
             temperature, top_p, generator)
    for ep in episodes:
        ep.text = tokenizer.decode(ep.ids)
    return episodes


def run_loop(model, tokenizer, prompts, episodes, on_token, act, after_token, temperature, top_p, generator):
    """The shared engine: prefill, then step until every row is done. Fills each episode's ids/mask/logps."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if any(len(p) == 0 for p in prompts):
        raise ValueError("rollout: every prompt needs at least one token")
    states = [Row(episode=ep, feed=list(p), slot=i) for i, (ep, p) in enumerate(zip(episodes, prompts))]
    capacity = max(len(p) for p in prompts) + 64
    cache = RowCache(len(states), capacity, device)
    live = list(states)  # rows still in the cache, in slot order
    while live:
        # 1) feed: decoding rows (one pending token) and chunk rows (prompt, or token + observation) separately
        singles = [s for s in live if len(s.feed) == 1]
        chunks = [s for s in live if len(s.feed) > 1]
        groups = [g for g in (singles, chunks) if g]
        acting = []
        for group in groups:
            rows = None if len(group) == len(live) else torch.tensor([s.slot for s in group], device=device)
            logits = forward_chunk(model, cache, rows, [s.feed for s in group], pad_id)
            # 2) sample
            tokens, logps = sample(logits, temperature, top_p, generator)
            for state, token, logp in zip(group, tokens.tolist(), logps.tolist()):
                ep = state.episode
                own = state.in_obs < 0  # tokens of a self-written observation are the environment's
                ep.ids.append(token)
                ep.mask.append(1 if own else 0)
                ep.logps.append(logp if own else 0.0)
                state.feed = [token]
                # 3) stops
                if on_token(state, token) == "action":
                    acting.append(state)
                elif after_token is not None and not state.done:
                    after_token(state)
        # 4) the tool, once for all rows that just acted
        if acting:
            act(acting)
        if any(s.done for s in live):  # drop finished rows from the cache
            live = [s for s in live if not s.done]
            if live:
                cache.keep(torch.tensor([s.slot for s in live], device=device))
                for i, s in enumerate(live):
                    s.slot = i


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, max_new_tokens, stop_strings=(), temperature=0.0, top_p=1.0,
             generator=None):
    """Plain batched KV-cached generation, no tools: for world-model observations and workflow baselines.

    prompt_ids: list of id lists (ragged is fine). Each sequence stops at EOS (kept), after the token that
    completes one of stop_strings (kept), or at max_new_tokens. Returns (ids, logps): two lists with one list
    per sequence, logps the untempered log-probs of the chosen tokens.
    """
    from tools import EnvConfig
    episodes = [Episode(question="", golds=[], prompt_ids=list(p)) for p in prompt_ids]
    stop_strings = [s for s in stop_strings if s]
    tags = Tags(tokenizer, EnvConfig(), stop_strings)

    def on_token(state, token):
        ep = state.episode
        if token == tokenizer.eos_token_id:
            ep.finish, state.done = "eos", True
        elif len(ep.ids) >= max_new_tokens:
            ep.finish, state.done = "length", True
        elif stop_strings and tags.can_end(token) and any(tags.just_wrote(ep.ids, 0, s) for s in stop_strings):
            ep.finish, state.done = "stop", True
        return None

    if max_new_tokens <= 0 or not episodes:
        return [[] for _ in episodes], [[] for _ in episodes]
    run_loop(model, tokenizer, [list(p) for p in prompt_ids], episodes, on_token, None, None,
             temperature, top_p, generator)
    return [ep.ids for ep in episodes], [ep.logps for ep in episodes]
