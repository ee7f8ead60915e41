"""Stage profile: route training samples through the fine-tuned SMoE; record usage and router logits."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from pipeline.data import load_prepared
from pipeline.modeling import atomic_dir, load_model, resolve_device
from pipeline.offload import profile_checkpoint
from pipeline.plots import plot_expert_usage
from pipeline.profiling import profile_gradients, profile_routing, save_profile
from pipeline.training import check_token_ids
from stages.common import load, mlflow_run, parser, section, stop_on_bad_input, weights_dtype, write_json


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="folder for profile.safetensors and profile.json")
    p.add_argument("--plot", default=None, help="PNG heatmap of expert usage")
    args = p.parse_args(argv)
    params = load(args)
    t0 = time.time()
    r = params.runtime
    with stop_on_bad_input():
        task = load_prepared(args.data, splits=("train",))
        # runtime.device_map: the model is dispatched over GPUs, RAM and disk when profiled, never
        # loaded whole (pipeline.offload checks the sample's token ids itself).
        model = None if r.device_map else load_model(args.model, dtype=weights_dtype(params))
        device = resolve_device(r.device)
    rows = task.splits["train"]
    n = params.profile.num_samples
    if n > len(rows):
        sys.exit(f"error: profile.num_samples={n} exceeds the {len(rows)} training examples")
    sample = random.Random(params.merge_seed).sample(rows, n)
    if model is not None:
        with stop_on_bad_input():
            check_token_ids(model, sample, (), "the prepared train split")
    with mlflow_run(
        params, args.params, "profile", section(params, "merge_seed", "profile", "runtime")
    ) as run:
        pp, pad = params.profile, task.tokenizer.pad_token_id
        if model is None:
            with stop_on_bad_input():
                profiles = profile_checkpoint(
                    args.model,
                    sample,
                    pad,
                    pp.batch_size,
                    r.device_map,
                    r.max_memory,
                    r.offload_folder,
                    pp.max_inputs,
                    pp.expert_outputs,
                )
        else:
            profiles = profile_routing(
                model, sample, pad, pp.batch_size, device, pp.max_inputs, expert_outputs=pp.expert_outputs
            )
        if pp.gradients:
            profile_gradients(model, sample, pad, pp.batch_size, device, profiles)
        with atomic_dir(args.out) as tmp:
            save_profile(profiles, tmp)
        if args.plot:
            plot = Path(args.plot)
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_expert_usage({n: p.frequency for n, p in profiles.items()}, plot)
            run.log_artifact(plot)
        metrics = {"samples": n, "seconds": round(time.time() - t0, 1), "layers": {}}
        for name, prof in profiles.items():
            f = prof.frequency
            metrics["layers"][name] = {
                "tokens": prof.tokens,
                "max_frequency": round(float(f.max()), 4),
                "min_frequency": round(float(f.min()), 4),
                "unused_experts": int((prof.counts == 0).sum()),
                "dropped_tokens": prof.tokens - prof.routed,
            }
        run.log_metrics(metrics)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    main()
