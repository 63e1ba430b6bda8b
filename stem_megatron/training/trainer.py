"""The training loop: one object that builds a run's components and steps them.

Each optimizer step prepares the STEM tables for the step's micro-batches (stem/tables.py),
runs them through megatron-core's forward-backward schedule (no pipelining, 1F1B or
interleaved, as the layout says) over the chunks in megatron-core's DDP, then steps the dense
optimizer and the tables under one global-norm clip (training/optimizer.py); it logs (with the
bytes each step moved), evaluates and checkpoints. docs/architecture.md draws one step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from stem_megatron.checkpoint.dcp import Checkpointer
from stem_megatron.config import RunConfig
from stem_megatron.config_loader import save_config
from stem_megatron.data.bundled import check_bundled_data_prepared
from stem_megatron.data.indexed import check_vocab, open_dataset
from stem_megatron.data.sampler import PackedSampleStream, ValidationBatches
from stem_megatron.data.tokenizer import load_tokenizer
from stem_megatron.model.transformer import StemGPTModel
from stem_megatron.parallel.comm_meter import CommMeter
from stem_megatron.parallel.data_parallel import (
    nan_check_reported_as_divergence,
    wrap_data_parallel,
    zero_grad_buffers,
)
from stem_megatron.parallel.dims import ParallelDims
from stem_megatron.parallel.state import ParallelState
from stem_megatron.planning.accounting import count_model
from stem_megatron.stem.tables import StemTables
from stem_megatron.training.lr_schedule import LRSchedule
from stem_megatron.training.metrics import MetricsLogger
from stem_megatron.training.model_chunks import build_model_chunks
from stem_megatron.training.optimizer import DenseOptimizer, optimizer_step
from stem_megatron.training.preemption import StopRequest
from stem_megatron.training.progress import TrainingProgress
from stem_megatron.training.state import TrainingState


@dataclass
class RunResult:
    step: int
    train_loss: float
    val_loss: float | None
    tokens_per_s: float
    stopped_by: str | None = None  # the signal that ended training early, after a save


def _inputs(tokens: torch.Tensor) -> torch.Tensor:
    """The ids a micro-batch's model forward reads (the last token is only a label)."""
    return tokens[:, :-1]


def _loss_func(per_token_loss: torch.Tensor):
    loss = per_token_loss.float().mean()
    # clone: megatron-core's schedule divides the returned loss in place by the micro-batch count
    return loss, {"lm loss": loss.detach().clone()}


class Trainer:
    def __init__(self, config: RunConfig, parallel: ParallelState):
        check_bundled_data_prepared(config.data)
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        self.vocab_size = config.model.vocab_size or self.tokenizer.vocab_size
        # What the run records (config.yaml, checkpoints) has its defaults spelled out.
        self.config, self.parallel = config.resolved(self.vocab_size), parallel
        c = self.config
        train_data = self._open_data(c.data.train_data)
        self.val_data = self._open_data(c.data.valid_data) if c.data.valid_data else None

        torch.manual_seed(c.train.seed)
        self.stem_layers = tuple(c.stem_layers())
        self.dims = ParallelDims(c, parallel.world_size, self.vocab_size)  # checks the layout
        self.chunks = build_model_chunks(self.dims, parallel)
        self.comm = CommMeter(
            parallel.tp_group,
            parallel.dp_group,
            parallel.dp_size,
            parallel.embedding_group if parallel.pp_size > 1 else None,
        )
        # What the schedule runs: the chunks in megatron-core's DDP.
        self.wrapped_chunks = wrap_data_parallel(self.chunks, c, self.comm)
        self.optimizer = DenseOptimizer(self.wrapped_chunks, self.chunks, c)
        self.tables = StemTables(self.chunks, c, parallel, train_data.tokens)
        self.schedule = LRSchedule.from_megatron(
            lr=c.optim.lr,
            min_lr=c.optim.min_lr,
            lr_warmup_iters=c.optim.lr_warmup_iters,
            train_iters=c.train.train_iters,
            lr_decay_iters=c.optim.lr_decay_iters,
            lr_decay_style=c.optim.lr_decay_style,
        )
        self.counts = count_model(c.model, self.vocab_size, self.stem_layers)
        self.num_microbatches = self.dims.num_microbatches
        self.train_stream = PackedSampleStream(
            train_data.tokens,
            c.model.seq_length,
            c.train.micro_batch_size,
            seed=c.train.seed,
            dp_rank=parallel.dp_rank,
            dp_size=parallel.dp_size,
        )
        self.val_batches = None
        if self.val_data is not None:
            # eval_iters global batches (Megatron's meaning): the same samples in any layout.
            self.val_batches = ValidationBatches(
                self.val_data.tokens,
                c.model.seq_length,
                c.train.micro_batch_size,
                c.train.eval_iters * self.num_microbatches,
                dp_rank=parallel.dp_rank,
                dp_size=parallel.dp_size,
            )
        self.checkpointer = Checkpointer(c.save_dir)
        self.state = TrainingState(
            self.chunks, self.optimizer, self.tables, self.train_stream, parallel
        )
        self.step = 0
        load, model_only = self._resume_path()
        if model_only:
            self.state.load_model_weights(load)
        elif load:
            self.step = self.state.load(self.checkpointer, load)
        # Refused now rather than after a whole run: an unwritable dir, no room, a taken step.
        if self.step < c.train.train_iters:
            self.state.check_can_save(self.checkpointer, self.step, c.train.train_iters)
        self.metrics = MetricsLogger(c.run_dir, enabled=parallel.is_main)
        self.metrics.truncate_after(self.step)
        if parallel.is_main:
            save_config(c, c.run_dir / "config.yaml")

    def _open_data(self, prefix: str):
        """The indexed dataset at `prefix`, its ids checked against the vocab and (when it
        records one) its tokenizer against ours."""
        data = open_dataset(
            prefix, vocab_size=self.vocab_size, require_meta=self.config.data.require_meta
        )
        if data.meta is not None:
            check_vocab(data, self.vocab_size, self.tokenizer)
        return data

    def _resume_path(self) -> tuple[str | None, bool]:
        """What to load, and whether its model weights only: `checkpoint.load`, with "auto"
        meaning this run's latest checkpoint. `checkpoint.finetune`: the model weights of
        `checkpoint.load`, unless this run has saved checkpoints of its own (requeued), which
        resume in full. A fresh start into a save dir that already holds checkpoints is
        refused: its later saves would collide with them."""
        load = self.config.checkpoint.load
        if load == "auto" or self.config.checkpoint.finetune:  # a resume of this run's own saves
            for line in self.checkpointer.recover_strays():
                if self.parallel.is_main:
                    print(line, flush=True)
        latest = self.checkpointer.latest()
        if self.config.checkpoint.finetune:
            return (str(latest), False) if latest is not None else (load, True)
        if load == "auto":
            return (str(latest) if latest is not None else None), False
        if load is None and latest is not None:
            raise ValueError(
                f"{self.config.save_dir} already holds checkpoints (latest: {latest.name}); "
                f"resume with checkpoint.load=auto, or start a new run with another "
                f"logging.run_dir or checkpoint.save"
            )
        return load, False

    # -- one step ----------------------------------------------------------------------
    def _forward_step(self, data_iterator: Iterator[torch.Tensor], model: StemGPTModel):
        # Every pipeline stage reads the micro-batch: each STEM layer needs the token ids.
        tokens = next(data_iterator).to(self.parallel.device)
        losses = model(_inputs(tokens), labels=tokens[:, 1:])
        return losses, _loss_func

    def _run_schedule(self, batches: list[torch.Tensor], forward_only: bool) -> float:
        """Run `batches` as one step's micro-batches through megatron-core's schedule (no
        pipelining, 1F1B or interleaved, from the parallel layout); the mean loss over the
        global batch, on every rank."""
        forward_backward = get_forward_backward_func()
        iterators = [iter(batches) for _ in self.wrapped_chunks]  # one per model chunk
        outputs = forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.wrapped_chunks,
            num_microbatches=len(batches),
            seq_length=self.config.model.seq_length,
            micro_batch_size=self.config.train.micro_batch_size,
            forward_only=forward_only,
        )
        p = self.parallel
        loss = torch.zeros((), dtype=torch.float32, device=p.device)
        if outputs:  # the last pipeline stage holds the losses
            loss = torch.stack([o["lm loss"] for o in outputs]).mean()
        with self.comm.purpose("other"):
            if p.pp_size > 1:
                dist.broadcast(loss, src=p.pp_last_rank, group=p.pp_group)
            if p.dp_size > 1:  # each replica saw its share of the global batch
                dist.all_reduce(loss, group=p.dp_group)
                loss /= p.dp_size
        return loss.item()

    def train_step(self) -> dict[str, float]:
        zero_grad_buffers(self.wrapped_chunks)
        self.optimizer.zero_grad()
        self.tables.zero_grad()
        batches = [next(self.train_stream) for _ in range(self.num_microbatches)]
        metrics = {}
        with self.comm.counting():
            lr_factor = self.schedule.factor(self.step)
            with (
                self.tables.prepare([_inputs(b) for b in batches], lr_factor),
                nan_check_reported_as_divergence(),
            ):
                # The schedule ends with megatron-core's finalize_model_grads: DP reduction,
                # the tied embedding over PP, norm weights over TP under SP.
                metrics["loss/train"] = self._run_schedule(batches, forward_only=False)
            metrics.update(
                optimizer_step(self.optimizer, self.tables, self.config.optim.clip_grad, lr_factor)
            )
        metrics.update(self.comm.take())  # bytes this step moved, by purpose and kind
        self.step += 1
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_batches is None:
            return None
        for chunk in self.chunks:
            chunk.eval()
        try:
            batches = list(self.val_batches)
            with self.tables.prepare([_inputs(b) for b in batches], lr_factor=None):
                return self._run_schedule(batches, forward_only=True)
        finally:
            for chunk in self.chunks:
                chunk.train()

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> RunResult:
        c = self.config
        tokens_per_step = c.train.global_batch_size * c.model.seq_length
        static = {
            "params/total": float(self.counts.total_params),
            "params/active": float(self.counts.active_params),
            "throughput/flops_per_token": float(self.counts.flops_per_token),
        }
        progress = TrainingProgress(
            c.train.train_iters,
            start_step=self.step,
            log_interval=c.logging.log_interval,
            enabled=self.parallel.is_main,
        )
        window, timed_steps, window_start = self.state.loss_window, 0, time.perf_counter()
        run_start, run_start_step = time.perf_counter(), self.step
        val_loss, metrics, stopped_by = None, {}, None
        with self.metrics, progress, StopRequest(self.parallel.device) as stop:
            while self.step < c.train.train_iters:
                metrics = self.train_step()
                window.add(metrics["loss/train"])
                timed_steps += 1
                progress.update(
                    self.step,
                    loss=window.mean,
                    tokens=tokens_per_step,
                    lr=metrics["optim/lr"],
                    grad_norm=metrics["optim/grad_norm"],
                )
                last = self.step == c.train.train_iters
                record = {}  # one metrics.jsonl object per step: train and val together
                if self.step % c.logging.log_interval == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        **metrics,
                        **static,
                        "loss/train": window.take(),
                        "throughput/tokens_per_s": tokens_per_step * timed_steps / elapsed,
                    }
                    timed_steps = 0
                if (c.train.eval_interval and self.step % c.train.eval_interval == 0) or last:
                    val_loss = self.evaluate()
                    if val_loss is not None:
                        record["loss/val"] = val_loss
                        progress.message(f"step {self.step} | val_loss {val_loss:.4f}")
                self.metrics.log(self.step, record)
                if not timed_steps:  # the next throughput window starts after evaluation
                    window_start = time.perf_counter()
                saved = (
                    c.checkpoint.save_interval and self.step % c.checkpoint.save_interval == 0
                ) or last
                if saved:
                    path = self.state.save(self.checkpointer, self.step, c)
                    progress.message(f"step {self.step} | saved {path}")
                if not last and stop.agreed():
                    stopped_by = stop.name
                    if not saved:
                        path = self.state.save(self.checkpointer, self.step, c)
                    progress.message(
                        f"step {self.step} | stopping on {stopped_by}: checkpoint {path}"
                    )
                    break
        elapsed = time.perf_counter() - run_start
        steps = self.step - run_start_step
        return RunResult(
            step=self.step,
            train_loss=metrics.get("loss/train", math.nan),
            val_loss=val_loss,
            tokens_per_s=tokens_per_step * steps / elapsed if steps else 0.0,
            stopped_by=stopped_by,
        )
