"""The 7B path, measured: QLoRA training and the decision runtime of each 7B family.

    python benchmarks/gpu_qlora.py                       # on a GPU: the three 7B families
    python benchmarks/gpu_qlora.py --families zephyr-7b-beta --steps 6 --out results.json
    python benchmarks/gpu_qlora.py --tiny                # the tiny-* presets: checks it on a CPU
    python benchmarks/gpu_qlora.py --processes 2         # training on 2 GPUs (DDP, one process per GPU)

For each family, a model is built from the family's published config (below) with random weights
(no download; the compute and memory of the real one), saved, and loaded back by chimein's own
`load_base_model` in 4-bit NF4 with bf16 compute. `apply_lora` puts LoRA r=64 on all projections;
`build_trainer` (the trainer `chimein train` runs) trains it with the method's batch 4 x 2,
gradient checkpointing and length 1024, on corpus chats joined to ~1024 tokens (the length the
published comparisons use). After an untimed warm-up, the trainers run on the same model and the
same rows, side by side (every step timed; each variant sees every row once):

  TRL SFTTrainer          TRL's trainer and loss (decision weight 1.0): the method as published
  decision-weighted loss  ours (weight 5): logits only where a label is
  + length-grouped        rows of similar length batched together: less padding
  + Liger kernels         Liger-Kernel's RMSNorm, SwiGLU and RoPE (GPU only; if it imports)

Each prints seconds per optimizer step, tokens per second (non-padding tokens, what is learned
from) and peak GPU memory. Then the decision runtime: a fresh 4-bit base with the
trained adapter in `GroupChatAssistant`, fed a long chat message by message: its peak memory and
per-message decision latency (p50 at the start and at the end of the chat).

With --processes N > 1 the script runs itself again under torchrun (`python -m
torch.distributed.run --standalone --nproc-per-node N`; its exit code is the script's): N ranks,
each on its GPU (LOCAL_RANK; gloo CPU processes with --tiny), load the random checkpoint (built
once, by rank 0) and train it with DDP, each rank on its share of the same rows. The global batch
stays 4 x 2 (each rank accumulates 2 / N micro-batches) where N divides 2; otherwise each rank
accumulates 1 and the global batch is 4 x N (the table says which). Only the training is measured
then: tokens/s over all ranks (the Trainer gathers the token counts), seconds per step as rank 0
sees them, peak memory the largest of any GPU. The decision runtime, the serving comparison and
--train-check are single-process measurements: skipped (run them without --processes). Rank 0
alone prints and writes --out.

Needs only torch, transformers, peft, accelerate, trl, bitsandbytes and datasets (and chimein's
own pydantic, pyyaml and platformdirs): no MLflow, no Prefect.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

# The published config.json of each family (architecture only; the weights are random).
MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    # HuggingFaceH4/zephyr-7b-beta
    "zephyr-7b-beta": ("mistral", MISTRAL_7B | dict(vocab_size=32000, max_position_embeddings=32768)),
    # openchat/openchat-3.5-0106
    "openchat-3.5-0106": ("mistral", MISTRAL_7B | dict(vocab_size=32002, max_position_embeddings=8192)),
    # meta-llama/Llama-2-7b-chat-hf
    "llama-2-7b-chat": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
}
TINY = {"zephyr-7b-beta": "tiny-zephyr", "openchat-3.5-0106": "tiny-openchat", "llama-2-7b-chat": "tiny-llama-2"}
VARIANTS = [("TRL SFTTrainer (the method)", 1.0, {}),
            ("decision-weighted loss", 5.0, {}),
            ("  + length-grouped batches", 5.0, {"group": True}),
            ("  + Liger kernels", 5.0, {"group": True, "liger": True})]
SHARED_WORK = "CHIMEIN_BENCH_WORK"  # --processes: the launcher's work directory, shared by the ranks


def world() -> tuple[int, int, int]:
    """(processes, rank, local rank) under torchrun; (1, 0, 0) in a single process."""
    return (int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)),
            int(os.environ.get("LOCAL_RANK", 0)))


def accumulation(processes: int) -> int:
    """Global gradient accumulation: the method's 2 (each rank accumulating 2 / processes), or
    `processes` (1 per rank, a global batch of 4 x processes) where processes does not divide 2."""
    return 2 if 2 % processes == 0 else processes


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier(device_ids=[world()[2]]) if torch.cuda.is_available() else dist.barrier()


def rank0_value(value):
    """Rank 0's `value` on every rank, so that the ranks take the same decisions."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_over_ranks(*values: float) -> list[float]:
    """Each of `values`, the largest over the ranks (the values themselves in a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def work_root(args) -> str | None:
    shm = Path("/dev/shm")
    return args.work_dir or (shm if shm.is_dir() and shutil.disk_usage(shm).free > 40e9 else None)


def launch(args) -> int:
    """--processes N: this script, with the same arguments, on N ranks under torchrun; its exit code."""
    import subprocess
    import sys

    import torch

    n = args.processes
    if torch.cuda.is_available() and n > torch.cuda.device_count():
        raise SystemExit(f"--processes {n} runs one process per GPU and this host has "
                         f"{torch.cuda.device_count()}: use --processes {torch.cuda.device_count()} or fewer")
    shared = tempfile.mkdtemp(prefix="gpu_qlora-", dir=work_root(args))
    env = dict(os.environ, **{SHARED_WORK: shared})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # torchrun's default: 1
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               os.path.abspath(__file__), *sys.argv[1:]]
    print(f"launching {n} processes: {' '.join(command)}", flush=True)
    try:
        return subprocess.run(command, env=env).returncode
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def apply_liger(model) -> None:
    """Liger-Kernel's RMSNorm, SwiGLU and RoPE on the base model, in place (its fused linear
    cross-entropy stays off: the decision-weighted loss computes logits only where labelled)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model.get_base_model(), rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)


def build_random_model(name: str, dst: Path, device: str) -> None:
    """The family's architecture with random weights, saved like a Hub checkpoint (bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    arch, values = CONFIGS[name]
    config = (MistralConfig if arch == "mistral" else LlamaConfig)(**values)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 7B parameters is seconds on a GPU, minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dst)
    del model
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None


def joined_chats(preset, tokenizer, max_length: int, n_rows: int):
    """Rows of corpus chats joined end to end while they fit max_length tokens."""
    from chimein.conversation import Conversation, load_conversations
    from chimein.formatting import TooLong, encode
    from chimein.paths import sample_data

    files = sorted(sample_data().parent.glob("part-*.jsonl"))  # the curated corpus
    convs = [c for f in files for c in load_conversations(f).conversations]
    rows, current = [], ()
    for conv in convs:
        joined = Conversation(current + conv.messages)
        try:
            ex = encode(joined, tokenizer, preset, max_length)
            if ex.truncated:
                raise TooLong("truncated")
            current, last = joined.messages, ex
        except TooLong:
            if current:
                rows.append(last)
            current, last = conv.messages, encode(Conversation(conv.messages), tokenizer, preset, max_length)
        if len(rows) == n_rows:
            break
    return rows, convs


def measure_family(name: str, args, work: Path) -> dict:
    import torch
    from datasets import Dataset, disable_progress_bars
    from peft import PeftModel
    from transformers import TrainerCallback

    from chimein.models.loading import load_base_model, load_tokenizer, resolve_compute_dtype
    from chimein.presets import load_preset
    from chimein.runtime.assistant import GroupChatAssistant
    from chimein.train.config import load_train_config
    from chimein.train.trainer import apply_lora, build_trainer, sft_args

    disable_progress_bars()
    cuda = torch.cuda.is_available()
    processes, rank, _ = world()
    multi = processes > 1
    preset = load_preset(TINY[name] if args.tiny else name)
    tokenizer = load_tokenizer(preset)
    out = {"family": preset.family, "preset": preset.name}
    t0 = time.perf_counter()
    if not args.tiny:  # the real architecture, random weights, loaded from a local directory
        weights = work / name
        if rank == 0:  # once: the ranks share the work directory
            build_random_model(name, weights, "cuda" if cuda else "cpu")
            tokenizer.save_pretrained(weights)
        barrier()
        preset = preset.model_copy(update={"hub_id": str(weights), "asset": None})
        out["build_s"] = time.perf_counter() - t0
    max_length = min(args.max_length, preset.max_length) if args.tiny else args.max_length
    cfg = load_train_config(model=preset.name, dataset="-", output_dir=str(work / "train"),
                            **{"lora.r": 64, "lora.alpha": 16, "quantization.load_in_4bit": True,
                               "quantization.compute_dtype": "bfloat16",
                               "trainer.per_device_train_batch_size": 4,
                               # global; sft_args gives each rank its share (WORLD_SIZE)
                               "trainer.gradient_accumulation_steps": accumulation(processes),
                               "trainer.processes": processes,
                               "trainer.gradient_checkpointing": True,
                               "trainer.max_steps": args.steps, "trainer.save_steps": 10_000,
                               "trainer.logging_steps": 1})
    dtype = resolve_compute_dtype(cfg.quantization.compute_dtype)
    batch = cfg.trainer.per_device_train_batch_size * cfg.trainer.gradient_accumulation_steps
    examples, convs = joined_chats(preset, tokenizer, max_length, batch * args.steps)
    train_ds = Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                                  "assistant_masks": [e.assistant_masks for e in examples],
                                  "decision_masks": [e.decision_masks for e in examples]})
    out["row_tokens_mean"] = statistics.mean(len(e.input_ids) for e in examples)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = load_base_model(preset, cfg.quantization, tokenizer, cfg.attn_implementation)
    out["load_4bit_s"] = time.perf_counter() - t0
    out["weights_gb"] = torch.cuda.memory_allocated() / 1e9 if cuda else None
    model = apply_lora(model, preset, cfg.lora, cfg.trainer.gradient_checkpointing)
    out["lora_params_m"] = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6

    class Steps(TrainerCallback):
        def __init__(self):
            self.start, self.marks = None, []  # (time, non-padding tokens seen) after each step

        def on_step_begin(self, a, state, control, **kw):
            if self.start is None:
                torch.cuda.synchronize() if cuda else None
                self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            torch.cuda.synchronize() if cuda else None
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    def run(weight: float, group: bool, steps: int, rows, callbacks=()):
        vcfg = cfg.model_copy(update={
            "loss": cfg.loss.model_copy(update={"decision_weight": weight}),
            "trainer": cfg.trainer.model_copy(update={"max_steps": steps})})
        sargs = sft_args(vcfg, work / "train" / f"w{weight:g}", max_length, dtype,
                         "cuda" if cuda else "cpu", progress=False)
        sargs.include_num_input_tokens_seen = "non_padding"
        sargs.train_sampling_strategy = "group_by_length" if group else "random"
        cols = ["input_ids", "assistant_masks"] + (["decision_masks"] if weight != 1.0 else [])
        trainer = build_trainer(vcfg, model, tokenizer, rows.select_columns(cols), sargs, dtype,
                                callbacks=list(callbacks))
        return trainer, trainer.train()

    run(5.0, False, 2, train_ds.select(range(2 * batch)))  # warm-up: kernels, allocator, autotuning
    if multi:
        gc.collect()  # the warm-up's DDP wrapper: its gradient hooks go with it
    out["train"] = {}
    for label, weight, opts in VARIANTS:
        if opts.get("liger"):
            if not cuda:
                print(f"  {preset.name} · {label}: skipped (Liger's kernels are Triton: GPU only)", flush=True)
                continue
            try:
                apply_liger(model)
            except Exception as e:  # noqa: BLE001 — an optional library: report, don't stop the benchmark
                print(f"  {preset.name} · {label}: not applied ({type(e).__name__}: {e})", flush=True)
                out["train"][label] = {"error": f"{type(e).__name__}: {e}"}
                continue
        steps = Steps()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            trainer, result = run(weight, opts.get("group", False), args.steps, train_ds, [steps])
        except Exception as e:  # noqa: BLE001 — the Liger variant may fail on a 4-bit base
            if not opts.get("liger"):
                raise
            print(f"  {preset.name} · {label}: failed ({type(e).__name__}: {e})", flush=True)
            out["train"][label] = {"error": f"{type(e).__name__}: {e}"}
            continue
        # tokens: the Trainer's count, gathered over the ranks (global); the time: rank 0's
        t_end, tokens = steps.marks[-1]
        peaks = (max_over_ranks(torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9)
                 if cuda else [None, None])  # per GPU: the largest of any rank's
        row = {"s_per_step": (t_end - steps.start) / len(steps.marks), "tokens_per_s": tokens / (t_end - steps.start),
               "steps_timed": len(steps.marks), "train_loss": result.training_loss,
               "peak_allocated_gb": peaks[0], "peak_reserved_gb": peaks[1]}
        out["train"][label] = row
        print(f"  {preset.name} · {label}: {row['s_per_step']:.2f} s/step, {row['tokens_per_s']:.0f} tokens/s"
              + (f", peak {row['peak_allocated_gb']:.1f} GB" if cuda else ""), flush=True)
        if multi:  # no decision runtime (below), no adapter to save
            del trainer
            gc.collect()
            continue
        adapter = work / "adapter"
        trainer.model.save_pretrained(adapter)
        del trainer
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if multi:  # the decision runtime and serving are one process's: measured without --processes
        print(f"  {preset.name} · decision runtime, serving: skipped with {processes} processes", flush=True)
        barrier()
        if rank == 0:
            if not args.tiny:
                shutil.rmtree(work / name, ignore_errors=True)
            shutil.rmtree(work / "train", ignore_errors=True)
        return out | {"runtime": None, "serving": None}

    # the decision runtime: a fresh 4-bit base and the adapter, as `chimein serve` loads them
    base = load_base_model(preset, cfg.quantization, tokenizer)
    model = PeftModel.from_pretrained(base, adapter).eval()
    model.config.use_cache = True
    bot = GroupChatAssistant(model, tokenizer, preset)
    chat = max(convs[:200], key=lambda c: c.n_user)
    users = [m for m in chat.messages if m.role == "user"] * 2  # a long chat: twice the longest
    latencies = []
    for m in users[: args.messages]:
        t0 = time.perf_counter()
        bot.add(m.name, m.content, reply=False)
        torch.cuda.synchronize() if cuda else None
        latencies.append(time.perf_counter() - t0)
    if args.profile:  # where one decision's time goes, at the end of the long chat
        import cProfile
        import pstats

        m = users[len(latencies) % len(users)]
        prof = cProfile.Profile()
        prof.enable()
        bot.add(m.name, m.content, reply=False)
        torch.cuda.synchronize() if cuda else None
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    out["serving"] = serving(bot, convs, args, cuda) if args.serve_conversations else None
    k = max(len(latencies) // 4, 1)
    out["runtime"] = {"messages": len(latencies), "tokens_in_context": len(bot.state.fed),
                      "latency_ms_p50_first_quarter": 1000 * statistics.median(latencies[1:k + 1]),
                      "latency_ms_p50_last_quarter": 1000 * statistics.median(latencies[-k:]),
                      "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
                      "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None}
    del bot, model, base
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if not args.tiny:
        shutil.rmtree(work / name, ignore_errors=True)
    shutil.rmtree(work / "train", ignore_errors=True)
    return out


def serving(bot, convs, args, cuda: bool) -> dict:
    """Many conversations at once, as `chimein serve` gets them: N conversations each get a
    message per round, decided one by one (`add`, a server with --max-batch 1) or together
    (`add_many`, one packed forward pass per round); then the same with every message answered
    (a reply of up to 16 tokens, generated together). The first round (each conversation's
    first message: the whole chat template) is not timed. Returns decisions/s of both, their
    ratio and the largest p_speak difference."""
    import torch

    from chimein.runtime.state import ConversationState

    n, rounds = args.serve_conversations, 4
    chats = [[m for m in c.messages if m.role == "user"] for c in convs if c.n_user >= rounds][:n]
    saved = bot.chattiness, bot.max_new_tokens
    out = {"conversations": len(chats), "rounds_timed": rounds - 1}
    for mode, chattiness in (("decide", 2.0), ("reply", -1.0)):
        bot.chattiness, bot.max_new_tokens = chattiness, 16
        speed, p = {}, {}
        for how in ("one_by_one", "together"):
            states = [ConversationState() for _ in chats]
            elapsed, p[how] = 0.0, []
            for r in range(rounds):
                requests = [(st, u[r].name, u[r].content, False) for st, u in zip(states, chats)]
                t0 = time.perf_counter()
                if how == "together":
                    ds = bot.add_many(requests)
                else:
                    ds = []
                    for st, who, text, _ in requests:
                        bot.use(st)
                        ds.append(bot.add(who, text))
                torch.cuda.synchronize() if cuda else None
                elapsed += (time.perf_counter() - t0) if r else 0.0
                p[how] += [d.p_speak for d in ds]
            speed[how] = len(chats) * (rounds - 1) / elapsed
        out[mode] = {"one_by_one_per_s": speed["one_by_one"], "together_per_s": speed["together"],
                     "ratio": speed["together"] / speed["one_by_one"],
                     "max_p_speak_diff": max(abs(a - b) for a, b in zip(p["one_by_one"], p["together"]))}
        print(f"  serving {mode}: {out[mode]}", flush=True)
    bot.chattiness, bot.max_new_tokens = saved
    return out


def train_check(args) -> dict:
    """chimein's own `train()` and `GroupChatAssistant.from_adapter` on this machine's device, as
    `chimein train` and `chimein serve` run them: a tiny preset in 4-bit NF4 (bf16 compute on a
    GPU), a few steps, MLflow in a temporary SQLite store; then decisions and a reply on the
    reloaded adapter. Needs MLflow."""
    import torch

    from chimein.models.assets import build_asset
    from chimein.paths import sample_data
    from chimein.runtime.assistant import GroupChatAssistant
    from chimein.train.config import load_train_config
    from chimein.train.launch import train

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.environ["CHIMEIN_STORE"] = f"{tmp}/store"
        build_asset(args.train_check)
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        cfg = load_train_config(**{"model": args.train_check, "dataset": str(sample_data()),
                                   "output_dir": f"{tmp}/out", "trainer.max_steps": 4,
                                   "quantization.load_in_4bit": True})
        result = train(cfg, progress=False)
        train_s = time.perf_counter() - t0
        bot = GroupChatAssistant.from_adapter(str(result.adapter_dir), max_new_tokens=8)
        d1 = bot.add("Ana", "assistant, who wrote Dune?", force=True)
        d2 = bot.add("Ben", "thanks!")
        out = {"preset": args.train_check, "train_s": train_s, "steps": result.steps,
               "final_loss": result.final_loss, "registered": result.registered,
               "adapter_dtype_device": bot.describe(),
               "decisions": [(d.speak, round(d.p_speak, 4), d.response) for d in (d1, d2)],
               "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None}
        print(f"  train check: {out}", flush=True)
        return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(CONFIGS), help="comma-separated 7B presets")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per trainer (one pass over the rows)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--messages", type=int, default=60, help="messages fed to the decision runtime")
    ap.add_argument("--tiny", action="store_true", help="the tiny-* presets (a CPU check of the script)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip a family when the time left is under the slowest family so far")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one decision")
    ap.add_argument("--out", help="write the results as JSON here (after each family)")
    ap.add_argument("--work-dir", help="where the random checkpoints go (default: /dev/shm if large)")
    ap.add_argument("--serve-conversations", type=int, default=16,
                    help="conversations decided one by one vs together (0: skip)")
    ap.add_argument("--train-check", metavar="PRESET",
                    help="first run chimein's own train() and from_adapter on PRESET (e.g. tiny-zephyr) "
                         "in 4-bit on this device (needs MLflow)")
    ap.add_argument("--processes", type=int, default=1,
                    help="train on N DDP processes, one per GPU (torchrun; gloo CPU processes with --tiny); "
                         "only the training is measured then")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA device: the 7B path needs a GPU (use --tiny to check the script on a CPU)")
    if args.processes < 1:
        raise SystemExit(f"--processes must be at least 1, not {args.processes}")
    processes, rank, local_rank = world()
    if args.processes > 1 and processes == 1:  # the launcher
        raise SystemExit(launch(args))
    if processes != args.processes:
        raise SystemExit(f"running on {processes} processes with --processes {args.processes}: "
                         "give --processes N to this script, not torchrun around it")
    if processes > 1:  # a rank: its own GPU; the process group the Trainer's DDP then uses
        import sys

        import torch.distributed as dist

        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        if rank:
            sys.stdout = open(os.devnull, "w")  # rank 0 prints (errors still go to stderr)
    root = Path(os.environ[SHARED_WORK]) if processes > 1 else work_root(args)
    started, slowest, results = time.perf_counter(), 0.0, []
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    header = {"device": f"{processes} x {device}" if cuda and processes > 1 else
              f"{device}, {processes} processes" if processes > 1 else device,
              "torch": torch.__version__}
    if processes > 1:
        acc = accumulation(processes)
        header |= {"processes": processes, "global_batch": f"4 x {acc}",
                   "per_rank_batch": f"4 x {acc // processes}"}
    for pkg in ("transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "liger_kernel"):
        try:
            header[pkg] = importlib.metadata.version(pkg.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            header[pkg] = None
    print(json.dumps(header), flush=True)
    if args.train_check and processes > 1:
        header["train_check"] = {"skipped": f"--processes {processes}: run --train-check without --processes"}
        print(f"  train check: {header['train_check']['skipped']}", flush=True)
    elif args.train_check:
        try:
            header["train_check"] = train_check(args)
        except Exception as e:  # noqa: BLE001 — reported; the measurements go on
            import traceback

            traceback.print_exc()
            header["train_check"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    for name in args.families.split(","):
        left = args.budget_s - (time.perf_counter() - started) if args.budget_s else None
        if rank0_value(left is not None and left < slowest * 1.1):  # the ranks skip together
            print(f"skipped {name}: {left:.0f} s left, the slowest family took {slowest:.0f} s", flush=True)
            continue
        t0 = time.perf_counter()
        if processes > 1:  # the launcher's directory, shared: rank 0 builds the checkpoint there
            results.append(measure_family(name, args, root) | {"total_s": time.perf_counter() - t0})
        else:
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                results.append(measure_family(name, args, Path(tmp)) | {"total_s": time.perf_counter() - t0})
        slowest = max(slowest, time.perf_counter() - t0)
        if args.out and rank == 0:
            Path(args.out).write_text(json.dumps(header | {"results": results}, indent=2))
    if rank == 0:
        report(header, results)
    if processes > 1:
        dist.destroy_process_group()


def report(header: dict, results: list[dict]) -> None:
    print(f"\n{header['device']} · torch {header['torch']} · transformers {header['transformers']} · "
          f"trl {header['trl']} · bitsandbytes {header['bitsandbytes']}")
    if "processes" in header:
        batch = (f"global batch {header['global_batch']} on {header['processes']} DDP processes "
                 f"({header['per_rank_batch']} each)")
    else:
        batch = "batch 4 x 2"
    print(f"training: 4-bit NF4, bf16 compute, LoRA r=64 on all projections, {batch}, "
          "gradient checkpointing, rows of joined chats up to 1024 tokens")
    if "processes" in header:
        print("tokens/s: over all processes; s/step: rank 0's; peak GB: per GPU, the largest of any rank")
    print(f"{'preset':<20}{'trainer':<36}{'s/step':>8}{'tokens/s':>10}{'peak GB':>9}{'ratio':>7}")
    for r in results:
        base = None
        for label, row in r["train"].items():
            if "error" in row:
                print(f"{r['preset']:<20}{label:<36}  {row['error'][:60]}")
                continue
            base = base or row["tokens_per_s"]
            peak = f"{row['peak_allocated_gb']:.1f}" if row["peak_allocated_gb"] is not None else "-"
            print(f"{r['preset']:<20}{label:<36}{row['s_per_step']:>8.2f}{row['tokens_per_s']:>10.0f}"
                  f"{peak:>9}{row['tokens_per_s'] / base:>6.2f}x")
    if "processes" in header:
        print(f"\ndecision runtime, serving: not measured on {header['processes']} processes "
              "(single-process measurements: run without --processes)")
    else:
        print("\ndecision runtime (fresh 4-bit base + adapter):")
        print(f"{'preset':<20}{'messages':>9}{'tokens':>8}{'p50 ms start':>14}{'p50 ms end':>12}{'peak GB':>9}")
    for r in [r for r in results if r.get("runtime")]:
        rt = r["runtime"]
        peak = f"{rt['peak_allocated_gb']:.1f}" if rt["peak_allocated_gb"] is not None else "-"
        print(f"{r['preset']:<20}{rt['messages']:>9}{rt['tokens_in_context']:>8}"
              f"{rt['latency_ms_p50_first_quarter']:>14.1f}{rt['latency_ms_p50_last_quarter']:>12.1f}{peak:>9}")
    served = [r for r in results if r.get("serving")]
    if served:
        print(f"\nmany conversations at once ({served[0]['serving']['conversations']} conversations, "
              "a message each per round): per second, one by one vs together")
        print(f"{'preset':<20}{'mode':<8}{'one by one':>11}{'together':>10}{'ratio':>7}{'max Δp':>9}")
        for r in served:
            for mode in ("decide", "reply"):
                m = r["serving"][mode]
                print(f"{r['preset']:<20}{mode:<8}{m['one_by_one_per_s']:>11.2f}{m['together_per_s']:>10.2f}"
                      f"{m['ratio']:>6.2f}x{m['max_p_speak_diff']:>9.1e}")
    if "train_check" in header:
        print(f"\nchimein train() + from_adapter on this device: {header['train_check']}")


if __name__ == "__main__":
    main()
