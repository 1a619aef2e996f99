"""The engine: requests in, token deltas out, one batched forward pass per step."""

from __future__ import annotations

import logging
import random
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence as Seq

import torch

from loramux.adapters_store.slot_pool import LoraSlotPool
from loramux.adapters_store.peft_format import AdapterError
from loramux.adapters_store.registry import COMPOSITE_CONFIG_FILE
from loramux.adapters_store.store import AdapterStore
from loramux.composites import BaseShape, CompositeOptions, CompositeRegistry, CompositeUse
from loramux.composites.scale_pool import ScaleRowPool
from loramux.config import EngineConfig
from loramux.engine.block_manager import BlockManager
from loramux.engine.cpu_features import NATIVE_BF16_FLAGS, cpu_flags, native_bf16_flag
from loramux.engine.detokenizer import IncrementalDetokenizer
from loramux.engine.loader import load_checkpoint
from loramux.engine.attention import select_attention_backend
from loramux.engine.layer_ops import select_layer_ops
from loramux.engine.cuda_graphs import MAX_GRAPH_LORA_DEPTH, DecodeGraphRunner
from loramux.engine.model import CausalLM, ModelShape
from loramux.engine.sampler import sample
from loramux.engine.scheduler import Scheduler
from loramux.engine.sequence import LoraMix, SamplingParams, Sequence, TokenLogprob
from loramux.engine.step_inputs import prepare_step_inputs
from loramux.engine.warmup import warm_up
from loramux.kernels import select_lora_backend

logger = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = 1.0


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
    queue_seconds: float | None = None  # arrival to first scheduled step, on a completion's first output
    error: str | None = None  # finish_reason "error": why this request (and only it) failed
    error_code: str | None = None  # "adapter_unavailable" (page-in failed) or "engine_error" (its step raised)
    composite: dict | None = None  # a composite request's gate report, on its last output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def accumulator(cls, out: "RequestOutput") -> "RequestOutput":
        """An empty output for `out`'s completion, to `merge` its deltas into."""
        return cls(out.request_id, out.index, [], "", None, out.num_prompt_tokens, 0)

    def merge(self, out: "RequestOutput") -> None:
        """Append a later delta of the same completion."""
        self.new_token_ids += out.new_token_ids
        self.new_text += out.new_text
        self.logprobs += out.logprobs
        self.finish_reason = out.finish_reason
        self.num_output_tokens = out.num_output_tokens
        self.composite = out.composite or self.composite


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, flags: frozenset[str] | None = None) -> tuple[torch.dtype, str]:
    """The serving dtype for `--dtype name` and why; `flags` are the CPU's (read from /proc/cpuinfo if None)."""
    if name != "auto":
        return getattr(torch, name), "--dtype " + name
    if device.type == "cuda":
        return torch.bfloat16, "--dtype auto on CUDA"
    flag = native_bf16_flag(cpu_flags() if flags is None else flags)
    if flag is not None:
        return torch.bfloat16, f"--dtype auto and the CPU has {flag}"
    return torch.float32, "--dtype auto and the CPU has no native bfloat16 (" + " or ".join(NATIVE_BF16_FLAGS) + ")"


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.model.device)
        self.dtype, why = resolve_dtype(config.model.dtype, self.device)
        logger.info("dtype %s: %s", str(self.dtype).removeprefix("torch."), why)
        torch.manual_seed(config.seed)
        self._seed_source = random.Random(config.seed)  # seeds of requests that name none
        checkpoint = load_checkpoint(config.model.model, config.model.cache_dir)
        self.model_id = config.model.served_model_name or checkpoint.model_id
        self.tokenizer = checkpoint.tokenizer
        self.checkpoint_folder = checkpoint.folder
        hf_config = checkpoint.config
        self.lora_backend = select_lora_backend(config.store.lora_backend, self.device, self.dtype,
                                                config.store.max_lora_rank)
        model_max = config.model.max_model_len or hf_config.max_position_embeddings
        shape = ModelShape.from_hf_config(hf_config)
        self.attention = select_attention_backend(config.model.attention_backend, shape.num_kv_heads, shape.head_dim,
                                                  config.cache.block_size, shape.sliding_window, self.device,
                                                  self.dtype)
        self.layer_ops = select_layer_ops(self.device, self.dtype)
        self.model = CausalLM(hf_config, checkpoint.weights, self.lora_backend, model_max, self.dtype, self.device,
                              self.attention, self.layer_ops)
        self.shape = self.model.shape
        self.slots = LoraSlotPool(self.model.lora_linears(), config.store.max_loras, config.store.max_lora_rank,
                                  self.device)
        self.store = AdapterStore(self.slots, self.shape.lora_target_shapes(), self.shape.num_layers,
                                  config.store.max_cpu_loras, config.store.max_adapter_bytes,
                                  Path(config.store.store_dir).expanduser() if config.store.store_dir else None,
                                  self.device, max_fused=config.router.max_fused,
                                  reserved_names=frozenset({"auto", self.model_id}))
        self.composites = CompositeRegistry(
            self.store, BaseShape(self.shape.lora_target_shapes(), self.shape.num_layers, self.shape.hidden_size,
                                  config.store.max_lora_rank, config.store.max_composite_members),
            config.store.max_composites, self.store.store_dir, self.device,
            ScaleRowPool(self.model.lora_linears(), config.store.mor_expert_rows))
        self.num_blocks = self._allocate_kv_cache()
        self.max_model_len = min(model_max, self.num_blocks * config.cache.block_size)
        self.blocks = BlockManager(self.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.store)
        self.eos_token_ids = self._eos_token_ids(hf_config)
        # Held around every run of the model (steps, graph captures); the `base` router embedder takes it too.
        self.model_lock = threading.Lock()
        self.decode_graphs = None
        if self.device.type == "cuda":
            self._warm_up_and_capture()
        self.last_step_num_tokens = 0
        self._sequences: dict[str, list[Sequence]] = {}
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        configured = [(name, path) for name, path in config.store.adapters.items()] + [
            (sub.name, str(sub)) for folder in config.store.adapter_dirs
            for sub in sorted(p for p in Path(folder).expanduser().iterdir() if (p / "adapter_config.json").is_file())]
        for name, path in configured:
            if self.store.is_uploaded(name):  # replaced by an upload (replace=true): the upload wins
                logger.info("adapter %s: serving the uploaded version, not %s", name, path)
                continue
            self.add_adapter(name, path)
        # Composites after every adapter (their members must exist); an uploaded one wins over a folder's.
        if self.store.store_dir is not None:
            self.composites.register_existing(self.store.store_dir)
        for folder in config.store.adapter_dirs:
            for sub in sorted(p for p in Path(folder).expanduser().iterdir() if (p / COMPOSITE_CONFIG_FILE).is_file()):
                if sub.name in self.composites:
                    logger.info("composite %s: serving the uploaded version, not %s", sub.name, sub)
                    continue
                self.add_adapter(sub.name, str(sub))
        logger.info("engine ready: model=%s device=%s dtype=%s kv_blocks=%d (block %d tokens) adapter_slots=%d "
                    "(rank <= %d) adapters=%d lora_backend=%s", self.model_id, self.device,
                    str(self.dtype).removeprefix("torch."), self.num_blocks, config.cache.block_size,
                    config.store.max_loras, config.store.max_lora_rank, len(self.store.records),
                    self.lora_backend.name)
        logger.info("attention backend: %s; layer ops: %s; decode CUDA graphs: %s", self.attention.name,
                    self.layer_ops.name, "on" if self.decode_graphs is not None else "off")

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
            # One budget: weights and adapter slots are already allocated; the KV cache takes the rest.
            _, total = torch.cuda.mem_get_info(self.device)
            budget = total * cache.gpu_memory_utilization - torch.cuda.memory_allocated(self.device)
            num_blocks = int(budget // bytes_per_block)
        else:
            num_blocks = int(CPU_KV_CACHE_GIB * 2**30 // bytes_per_block)
        if num_blocks < 1:
            raise ValueError("the KV cache budget holds no block; raise --kv-cache-memory-gib or "
                             "--gpu-memory-utilization, or lower --max-loras")
        slot_bytes = sum(m.lora_a.nbytes + m.lora_b.nbytes for _, m in self.model.lora_linears())
        weight_bytes = sum(p.nbytes for p in self.model.parameters())
        logger.info("memory: weights %.2f GiB, adapter slots %.2f GiB (%d x rank %d), KV cache %.2f GiB (%d blocks)",
                    weight_bytes / 2**30, slot_bytes / 2**30, self.config.store.max_loras,
                    self.config.store.max_lora_rank, num_blocks * bytes_per_block / 2**30, num_blocks)
        slots = (num_blocks + 1) * cache.block_size  # the spare scratch block: graph padding and warm-up write there
        self.model.kv_caches = [
            (torch.zeros(slots, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device),
             torch.zeros(slots, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device))
            for _ in range(s.num_layers)]
        return num_blocks

    @property
    def graph_lora_depth(self) -> int:
        """The deepest LoRA mix captured in decode graphs (and warmed up). A plain mix can be as deep as the
        limit; a composite's (its members, a MoR's experts) up to --max-composite-members, and steps deeper than
        the graphs run eagerly."""
        limit = min(self.config.store.max_loras, self.config.scheduler.max_loras_per_batch)
        return min(limit, MAX_GRAPH_LORA_DEPTH)

    def make_decode_graphs(self, use_cuda_graphs: bool = True) -> DecodeGraphRunner:
        """Static decode buffers over the spare KV block (the scratch block, past the last real one)."""
        block_size = self.config.cache.block_size
        return DecodeGraphRunner(self.model, self.config.scheduler.max_num_seqs, -(-self.max_model_len // block_size),
                                 scratch_block=self.num_blocks, block_size=block_size,
                                 max_depth=self.graph_lora_depth, device=self.device, use_cuda_graphs=use_cuda_graphs,
                                 composites=self.composites)

    def _warm_up_and_capture(self) -> None:
        """Compile every kernel variant and capture the decode graphs before serving (CUDA only).

        The LoRA backend compiles its variants directly (the forward passes
        below cannot guarantee to select each one); the forward passes then
        compile attention and capture the graphs.
        """
        self.lora_backend.warm_up({m.shape for _, m in self.model.lora_linears()}, self.slots.max_rank, self.dtype,
                                  self.device)
        graphs = None
        if not self.config.model.enforce_eager and self.attention.graph_capturable:
            graphs = self.make_decode_graphs()
        warm_up(self.model, self.attention, graphs, self.config.scheduler.max_num_seqs,
                self.config.scheduler.max_num_batched_tokens, self.max_model_len, self.graph_lora_depth,
                scratch_block=self.num_blocks, block_size=self.config.cache.block_size,
                slot_scales=self.slots.scales, r_max=self.slots.max_rank, device=self.device)
        self.decode_graphs = graphs

    def _eos_token_ids(self, hf_config) -> frozenset[int]:
        ids = getattr(hf_config, "eos_token_id", None)
        ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    # ---------------------------------------------------------------- adapters
    def add_adapter(self, name: str, path: str, metadata: dict | None = None, replace: bool = False) -> None:
        """Validate the PEFT (or composite) folder at `path` and register it under `name` (it pages in when used)."""
        if (Path(path).expanduser() / COMPOSITE_CONFIG_FILE).is_file():
            self.composites.register_path(name, path, replace=replace)
            return
        record = self.store.register_path(name, path, metadata, replace=replace)
        logger.info("adapter %s: rank %d, targets %s", name, record.rank, ",".join(record.target_modules))

    def remove_adapter(self, name: str) -> None:
        """Unregister now; requests already using it finish first, then its slot and files are freed."""
        if name in self.composites:
            self.composites.delete(name)
            return
        self.store.delete(name)

    @property
    def adapter_names(self) -> list[str]:
        return sorted(self.store.records)

    def _resolve_composite(self, lora_mix: Seq) -> tuple[Seq, CompositeUse | None]:
        """A mix that names a composite (alone; options in a dict entry) -> its members' mix and its use."""
        entries = [{"name": e} if isinstance(e, str) else e if isinstance(e, dict) else {"name": e[0]}
                   for e in lora_mix]
        named = [e for e in entries if e["name"] in self.composites]
        if not named:
            if any(set(e) - {"name", "weight", "rank_lo", "rank_hi"} for e in entries):
                raise RequestError("mask, top_k, task and per_layer apply to composite experts only",
                                   param="adapters")
            return [(e["name"], e.get("weight", 1.0), e.get("rank_lo", 0), e.get("rank_hi")) if isinstance(e, dict)
                    else e for e in lora_mix], None
        if len(entries) > 1:
            raise RequestError("a composite expert must be the only entry of a mix", param="adapters")
        options = named[0]
        if set(options) - {"name", "mask", "top_k", "task", "per_layer"}:
            raise RequestError("a composite takes the options mask, top_k, task and per_layer only",
                               param="adapters")
        try:
            return self.composites.resolve(options["name"], CompositeOptions(
                mask=tuple(options.get("mask") or ()), top_k=options.get("top_k"), task=options.get("task"),
                per_layer=bool(options.get("per_layer", False))))
        except AdapterError as exc:
            raise RequestError(str(exc), param="adapters", code=exc.code) from exc

    def _normalize_mix(self, lora_mix, repeats_allowed: bool = False) -> LoraMix:
        """Accept names, (name, weight) or (name, weight, lo, hi); check them against the pool.
        repeats_allowed: the registry's mix of a MoR composite, whose experts all name its shared member."""
        out = []
        for entry in lora_mix:
            name, weight, lo, hi = ((entry, 1.0, 0, None) if isinstance(entry, str) else (tuple(entry) + (0, None))[:4])
            if name not in self.store:
                raise RequestError(f"adapter {name!r} does not exist", param="adapters", code="adapter_not_found")
            rank = self.store.get(name).rank
            hi = rank if hi is None else hi
            if not 0 <= lo < hi <= rank:
                raise RequestError(f"rank range {lo}:{hi} of adapter {name!r} must lie within 0:{rank}",
                                   param="adapters")
            out.append((name, float(weight), int(lo), int(hi)))
        distinct = len({name for name, *_ in out})
        if distinct != len(out) and not repeats_allowed:
            raise RequestError("an adapter appears twice in the mix", param="adapters")
        limit = min(self.config.store.max_loras, self.config.scheduler.max_loras_per_batch)
        if distinct > limit:
            raise RequestError(f"a mix may name at most {limit} adapters on this server", param="adapters")
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
        lora_mix, composite = self._resolve_composite(lora_mix)
        try:
            mix = self._normalize_mix(lora_mix, repeats_allowed=composite is not None and composite.kind == "mor")
        except RequestError:
            if composite is not None:
                self.composites.release(composite)
            raise
        identity = (tuple((self.store.get(name).checksum, w, lo, hi) for name, w, lo, hi in mix),
                    None if composite is None else composite.cache_key)
        # Nothing that can fail comes after the first registration below, so a refusal leaves no state.
        base_seed = sampling.seed if sampling.seed is not None else self._seed_source.getrandbits(64)
        seqs = [Sequence(request_id, index, prompt_ids, sampling, mix, (base_seed + index) % 2**64, identity,
                         composite if index == 0 or composite is None else composite.fresh())
                for index in range(sampling.n)]
        for _ in seqs[1:] if composite is not None else ():
            self.composites.acquire_again(composite)
        self._sequences[request_id] = seqs
        for seq in seqs:
            self._detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, sampling.stop)
            self.store.acquire(seq.adapter_names)
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; unknown ids are ignored."""
        for seq in self._sequences.pop(request_id, []):
            if not seq.is_finished:
                self._finish(seq, "abort")
            self._detokenizers.pop(seq.seq_id, None)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.store.release(seq.adapter_names)
        if seq.composite is not None:
            self.composites.release(seq.composite)

    def is_request_active(self, request_id: str) -> bool:
        return request_id in self._sequences

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # -------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample, and report what changed.

        Errors stay with the requests that caused them: a failed page-in fails
        the sequences of that adapter; a forward pass that raises puts the
        step's sequences in quarantine (the scheduler reruns them one at a
        time) and one that raises alone fails that request only.
        """
        plan = self.scheduler.schedule()
        self.last_step_num_tokens = plan.num_tokens
        failed = [self._fail(seq, message, "adapter_unavailable") for seq, message in plan.failed]
        if plan.is_empty:
            return failed
        sampling_seqs = [item.seq for item in plan.scheduled if item.samples]
        try:
            # Decode graphs hold one plan level per mixture depth; eager steps take a flat plan where they can.
            flat = self.lora_backend.takes_flat_plans and self.decode_graphs is None
            inputs = prepare_step_inputs(plan, self.attention, self.slots, self.device, self.composites, flat,
                                         self.lora_backend.reads_mode_tensors)
            self.store.wait_for_page_ins()
            if self.decode_graphs is not None and self.decode_graphs.can_run(inputs):
                logits = self.decode_graphs.run(inputs)
            else:
                logits = self.model(inputs.input_ids, inputs.positions, inputs.ctx, inputs.logit_rows)
            if sampling_seqs:
                tokens, logprobs = sample(logits, [s.sampling for s in sampling_seqs], [s.seed for s in sampling_seqs],
                                          [len(s.output_ids) for s in sampling_seqs])
                if inputs.ctx.composite is not None:
                    inputs.ctx.composite.record_sampled()
        except Exception as exc:
            return failed + self._contain_step_error(plan, exc)
        for item in plan.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.blocks.commit(item.seq)
            self.scheduler.cleared(item.seq)
        if not sampling_seqs:
            return failed
        return failed + [self._append_token(seq, token, lp) for seq, token, lp in zip(sampling_seqs, tokens, logprobs)]

    def _contain_step_error(self, plan, exc: Exception) -> list[RequestOutput]:
        seqs = [item.seq for item in plan.scheduled]
        if len(seqs) > 1:
            logger.warning("a step of %d sequences failed (%s: %s); rerunning them one at a time to find the "
                           "cause", len(seqs), type(exc).__name__, exc)
            self.scheduler.quarantine(seqs)
            return []
        logger.error("request %s failed its step alone", seqs[0].request_id, exc_info=exc)
        return [self._fail(seqs[0], f"the engine failed while running this request ({type(exc).__name__}: {exc})",
                           "engine_error")]

    def _fail(self, seq: Sequence, message: str, code: str) -> RequestOutput:
        """End one sequence with finish_reason "error"; its request's other completions go too."""
        for other in self._sequences.get(seq.request_id, [seq]):
            if not other.is_finished:
                self._finish(other, "error")
            self._detokenizers.pop(other.seq_id, None)
        self._sequences.pop(seq.request_id, None)
        return RequestOutput(request_id=seq.request_id, index=seq.index, new_token_ids=[], new_text="",
                             finish_reason="error", num_prompt_tokens=len(seq.prompt_ids),
                             num_output_tokens=len(seq.output_ids), error=message, error_code=code)

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        p = seq.sampling
        seq.output_ids.append(token)
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
            self._finish(seq, finish)
            self._detokenizers.pop(seq.seq_id)
        out = RequestOutput(
            request_id=seq.request_id, index=seq.index, new_token_ids=[token], new_text=detok.flush(finish is not None),
            finish_reason=finish, num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=len(seq.output_ids),
            logprobs=[logprob] if logprob is not None else [],
            queue_seconds=seq.first_scheduled_time - seq.arrival_time if len(seq.output_ids) == 1 else None,
            composite=seq.composite.summary() if finish is not None and seq.composite is not None else None)
        if finish is not None and all(s.is_finished for s in self._sequences[seq.request_id]):
            del self._sequences[seq.request_id]
        return out

    # ------------------------------------------------------------ convenience
    def generate(self, prompts: list[str | list[int]], sampling: SamplingParams | None = None,
                 lora_mixes: list[Seq] | None = None) -> list[list[RequestOutput]]:
        """Run prompts to completion; returns, per prompt, one merged output per completion index."""
        batch = uuid.uuid4().hex
        ids = [f"generate-{batch}-{i}" for i in range(len(prompts))]
        for rid, prompt, mix in zip(ids, prompts, lora_mixes or [()] * len(prompts)):
            self.add_request(rid, prompt, sampling, mix)
        results = {rid: {} for rid in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                results[out.request_id].setdefault(out.index, RequestOutput.accumulator(out)).merge(out)
        return [[results[rid][i] for i in sorted(results[rid])] for rid in ids]
