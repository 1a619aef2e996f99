"""The engine: requests in, token deltas out, one batched forward pass per step."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from loramux.adapters_store.peft_format import AdapterError, read_peft_folder
from loramux.adapters_store.slot_pool import LoraSlotPool
from loramux.config import EngineConfig
from loramux.engine.attention import AttentionMetadata, PrefillSpan, context_slots, window_mask
from loramux.engine.block_manager import BlockManager
from loramux.engine.detokenizer import IncrementalDetokenizer
from loramux.engine.loader import load_checkpoint
from loramux.engine.model import CausalLM, StepContext
from loramux.engine.sampler import sample
from loramux.engine.scheduler import SchedulePlan, Scheduler
from loramux.engine.sequence import LoraMix, SamplingParams, Sequence, TokenLogprob
from loramux.kernels import build_lora_plan, select_lora_backend

logger = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = 1.0
CUDA_MEMORY_FRACTION = 0.9


class RequestError(ValueError):
    """A request the engine cannot run; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class RequestOutput:
    """What one step produced for one completion (index) of a request."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        torch.manual_seed(config.seed)
        self._seed_source = torch.Generator().manual_seed(config.seed)
        checkpoint = load_checkpoint(config.model.model, config.model.cache_dir)
        self.model_id = config.model.served_model_name or checkpoint.model_id
        self.tokenizer = checkpoint.tokenizer
        self.checkpoint_folder = checkpoint.folder
        hf_config = checkpoint.config
        self.lora_backend = select_lora_backend(config.store.lora_backend, self.device)
        model_max = config.model.max_model_len or hf_config.max_position_embeddings
        self.model = CausalLM(hf_config, checkpoint.weights, self.lora_backend, model_max, self.dtype, self.device)
        self.shape = self.model.shape
        self.slots = LoraSlotPool(self.model.lora_linears(), config.store.max_loras, config.store.max_lora_rank,
                                  self.device)
        self.num_blocks = self._allocate_kv_cache()
        self.max_model_len = min(model_max, self.num_blocks * config.cache.block_size)
        self.blocks = BlockManager(self.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.eos_token_ids = self._eos_token_ids(hf_config)
        self._sequences: dict[str, list[Sequence]] = {}
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        for name, path in config.store.adapters.items():
            self.add_adapter(name, path)
        logger.info("engine ready: model=%s device=%s dtype=%s kv_blocks=%d (block %d tokens) adapter_slots=%d "
                    "lora_backend=%s", self.model_id, self.device, str(self.dtype).removeprefix("torch."),
                    self.num_blocks, config.cache.block_size, config.store.max_loras, self.lora_backend.name)

    # ------------------------------------------------------------------ set-up
    def _allocate_kv_cache(self) -> int:
        cache, s = self.config.cache, self.shape
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        bytes_per_block = 2 * s.num_layers * cache.block_size * s.num_kv_heads * s.head_dim * itemsize
        if cache.num_blocks is not None:
            num_blocks = cache.num_blocks
        elif cache.kv_cache_memory_gib is not None:
            num_blocks = int(cache.kv_cache_memory_gib * 2**30 // bytes_per_block)
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            num_blocks = int(free * CUDA_MEMORY_FRACTION // bytes_per_block)
        else:
            num_blocks = int(CPU_KV_CACHE_GIB * 2**30 // bytes_per_block)
        if num_blocks < 1:
            raise ValueError("the KV cache budget holds no block; raise --kv-cache-memory-gib")
        slots = num_blocks * cache.block_size
        self.model.kv_caches = [
            (torch.zeros(slots, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device),
             torch.zeros(slots, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device))
            for _ in range(s.num_layers)]
        return num_blocks

    def _eos_token_ids(self, hf_config) -> frozenset[int]:
        ids = getattr(hf_config, "eos_token_id", None)
        ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    # ---------------------------------------------------------------- adapters
    def add_adapter(self, name: str, path: str) -> None:
        """Validate the PEFT folder at `path` and load it into a free slot under `name`."""
        adapter = read_peft_folder(path, self.shape.lora_target_shapes(), self.shape.num_layers,
                                   self.config.store.max_lora_rank)
        self.slots.load(name, adapter)
        logger.info("adapter %s: rank %d, targets %s", name, adapter.rank, ",".join(adapter.target_modules))

    def remove_adapter(self, name: str) -> None:
        if name not in self.slots:
            raise AdapterError("not_found", f"adapter {name!r} is not loaded")
        if any(name in s.adapter_names for seqs in self._sequences.values() for s in seqs if not s.is_finished):
            raise AdapterError("in_use", f"adapter {name!r} is used by running requests")
        self.slots.unload(name)

    @property
    def adapter_names(self) -> list[str]:
        return sorted(self.slots.slot_of)

    def _normalize_mix(self, lora_mix) -> LoraMix:
        """Accept names, (name, weight) or (name, weight, lo, hi); check them against the pool."""
        out = []
        for entry in lora_mix:
            name, weight, lo, hi = ((entry, 1.0, 0, None) if isinstance(entry, str) else (tuple(entry) + (0, None))[:4])
            if name not in self.slots:
                raise RequestError(f"adapter {name!r} does not exist", param="adapters", code="adapter_not_found")
            rank = self.slots.ranks[self.slots.slot_of[name]]
            hi = rank if hi is None else hi
            if not 0 <= lo < hi <= rank:
                raise RequestError(f"rank range {lo}:{hi} of adapter {name!r} must lie within 0:{rank}",
                                   param="adapters")
            out.append((name, float(weight), int(lo), int(hi)))
        if len({name for name, *_ in out}) != len(out):
            raise RequestError("an adapter appears twice in the mix", param="adapters")
        return tuple(out)

    # ---------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | list[int], sampling: SamplingParams | None = None,
                    lora_mix: Seq = ()) -> None:
        """Queue a request; `lora_mix` lists adapter names, (name, weight) or (name, weight, lo, hi)."""
        if request_id in self._sequences:
            raise RequestError(f"request id {request_id!r} is already in use")
        sampling = sampling or SamplingParams()
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else prompt
        if not prompt_ids:
            raise RequestError("the prompt is empty", param="prompt")
        if any(not 0 <= t < self.shape.vocab_size for t in prompt_ids):
            raise RequestError("prompt token ids must lie within the vocabulary", param="prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                               f"{self.max_model_len} tokens and at least one must be generated",
                               param="prompt", code="context_length_exceeded")
        mix = self._normalize_mix(lora_mix)
        seqs = []
        for index in range(sampling.n):
            seed = (sampling.seed + index if sampling.seed is not None
                    else int(torch.randint(0, 2**62, (), generator=self._seed_source)))
            seq = Sequence(request_id, index, prompt_ids, sampling, mix, torch.Generator().manual_seed(seed))
            self._detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, sampling.stop)
            seqs.append(seq)
        self._sequences[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; unknown ids are ignored."""
        for seq in self._sequences.pop(request_id, []):
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
            self._detokenizers.pop(seq.seq_id, None)

    def is_request_active(self, request_id: str) -> bool:
        return request_id in self._sequences

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # -------------------------------------------------------------------- step
    def _prepare(self, plan: SchedulePlan) -> tuple[torch.Tensor, torch.Tensor, StepContext, list[int]]:
        bs = self.config.cache.block_size
        window = self.shape.sliding_window
        token_ids: list[int] = []
        positions: list[int] = []
        runs = []
        logit_rows = []
        prefills = []
        for item in plan.scheduled:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            row = len(token_ids)
            token_ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            if seq.lora_mix:
                runs.append((row, n, [(self.slots.slot_of[name], w, lo, hi) for name, w, lo, hi in seq.lora_mix]))
            if item.samples:
                logit_rows.append(row + n - 1)
        pos = torch.tensor(positions, dtype=torch.int64)
        seqs = [item.seq for item in plan.scheduled]
        max_blocks = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (max_blocks - len(s.block_table)) for s in seqs],
                              dtype=torch.int64)
        row_table = torch.repeat_interleave(tables, torch.tensor([i.num_new_tokens for i in plan.scheduled]), dim=0)
        slot_mapping = context_slots(row_table, pos[:, None], bs)[:, 0]

        num_decode = len(plan.decode)
        decode_gather = decode_mask = None
        if num_decode:
            ctx_lens = pos[:num_decode] + 1
            key_pos = torch.arange(int(ctx_lens.max()))[None, :].expand(num_decode, -1)
            decode_gather = context_slots(tables[:num_decode], key_pos, bs)
            decode_mask = window_mask(pos[:num_decode, None], key_pos, window)[:, None, None, :]
        row = num_decode
        for i, item in enumerate(plan.prefill, start=num_decode):
            start, n = item.seq.num_computed_tokens, item.num_new_tokens
            if start == 0:
                # A chunk from position 0 attends only to itself: batch it with the previous one if same length.
                last = prefills[-1] if prefills else None
                if last is not None and last.gather_idx is None and last.length == n:
                    last.num_seqs += 1
                else:
                    mask = None
                    if window is not None and n > window:
                        key_pos = torch.arange(n)
                        mask = window_mask(key_pos[:, None], key_pos[None, :], window).to(self.device)
                    prefills.append(PrefillSpan(row, n, 1, None, mask))
            else:
                key_pos = torch.arange(start + n)
                mask = window_mask(pos[row:row + n, None], key_pos[None, :], window).to(self.device)
                prefills.append(PrefillSpan(row, n, 1, context_slots(tables[i], key_pos, bs).to(self.device), mask))
            row += n

        attention = AttentionMetadata(
            slot_mapping=slot_mapping.to(self.device), num_decode=num_decode,
            decode_gather=None if decode_gather is None else decode_gather.to(self.device),
            decode_mask=None if decode_mask is None else decode_mask.to(self.device),
            prefills=prefills)
        lora_plan = build_lora_plan(runs, self.slots.scales, self.slots.max_rank, self.device)
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        return ids, pos.to(self.device), StepContext(attention, lora_plan), logit_rows

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample, and report what changed."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        ids, positions, ctx, logit_rows = self._prepare(plan)
        logits = self.model(ids, positions, ctx, torch.tensor(logit_rows, dtype=torch.int64, device=self.device))
        sampling_seqs = [item.seq for item in plan.scheduled if item.samples]
        for item in plan.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.blocks.commit(item.seq)
        if not sampling_seqs:
            return []
        tokens, logprobs = sample(logits, [s.sampling for s in sampling_seqs], [s.generator for s in sampling_seqs])
        return [self._append_token(seq, token, lp) for seq, token, lp in zip(sampling_seqs, tokens, logprobs)]

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        p = seq.sampling
        seq.output_ids.append(token)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        finish = None
        is_stop_token = token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos)
        detok = self._detokenizers[seq.seq_id]
        if is_stop_token:
            finish = "stop"
        elif detok.add(token):
            finish = "stop"
        elif len(seq.output_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            finish = "length"
        if finish is not None:
            self.scheduler.finish(seq, finish)
            self._detokenizers.pop(seq.seq_id)
        out = RequestOutput(
            request_id=seq.request_id, index=seq.index, new_token_ids=[token], new_text=detok.flush(finish is not None),
            finish_reason=finish, num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=len(seq.output_ids),
            logprobs=[logprob] if logprob is not None else [])
        if finish is not None and all(s.is_finished for s in self._sequences[seq.request_id]):
            del self._sequences[seq.request_id]
        return out

    # ------------------------------------------------------------ convenience
    def generate(self, prompts: list[str | list[int]], sampling: SamplingParams | None = None,
                 lora_mixes: list[Seq] | None = None) -> list[list[RequestOutput]]:
        """Run prompts to completion; returns, per prompt, one merged output per completion index."""
        ids = [f"generate-{i}-{id(prompts)}" for i in range(len(prompts))]
        for rid, prompt, mix in zip(ids, prompts, lora_mixes or [()] * len(prompts)):
            self.add_request(rid, prompt, sampling, mix)
        results = {rid: {} for rid in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                merged = results[out.request_id].setdefault(out.index, RequestOutput(
                    out.request_id, out.index, [], "", None, out.num_prompt_tokens, 0))
                merged.new_token_ids += out.new_token_ids
                merged.new_text += out.new_text
                merged.logprobs += out.logprobs
                merged.finish_reason = out.finish_reason
                merged.num_output_tokens = out.num_output_tokens
        return [[results[rid][i] for i in sorted(results[rid])] for rid in ids]
