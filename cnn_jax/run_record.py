"""What a run records about itself: `run_info.json`, each checkpoint's meta, `summary.json` — built here only.

  record = RunRecord(config, info, lineage, inference)   # identity, fingerprints, lineage of the run
  record.run_info(...)          # written once the programs are compiled
  record.checkpoint_meta(...)   # saved beside every checkpoint (what a resume and predict.py need)
  record.summary(...)           # written when the run finishes

The identity (model, class count, model switches, input size) must match for a checkpoint to be resumed;
the recipe fingerprint (cnn_jax.fingerprint) must match for runs to be compared.
"""

from typing import Any, Dict, Optional

import jax

from cnn_jax import fingerprint as fingerprint_lib


class RunRecord:
  """The facts of one run that every record repeats, and the three records built from them."""

  def __init__(self, config, info, lineage: Dict[str, Any], inference: Dict[str, Any]):
    self.config = config
    self.info = info
    self.lineage = lineage
    self.inference = inference
    fp = fingerprint_lib.fingerprint(config)
    self.config_hash, self.fingerprint_fields = fp["hash"], fp["fields"]
    self.identity = identity(config, info.num_classes)

  @property
  def fingerprint(self) -> str:
    """The run's fingerprint: the config's, or a `changed-...` one once the config changed mid-run."""
    return fingerprint_lib.run_fingerprint(self.config_hash, self.lineage)

  def expected(self) -> Dict[str, Any]:
    """What a checkpoint of this workdir must match (identity) or is compared with (the rest)."""
    return {**self.identity, "dataset": self.info.name, "fingerprint_fields": self.fingerprint_fields,
            "config": self.config.to_json_best_effort()}

  def run_info(self, *, params: int, steps_per_epoch: int, total_steps: int, layer_order,
               train_flops_per_step: float, flops_per_example: float) -> Dict[str, Any]:
    config, info = self.config, self.info
    return {
        "input": config.input, "model": config.model, "model_kwargs": config.model_kwargs.to_dict(),
        "dataset": info.name, "num_classes": info.num_classes, "class_names": list(info.class_names or []),
        "num_train": info.num_train, "num_eval": info.num_eval, "params": params,
        "image_size": config.image_size, "dtype": config.dtype,
        "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
        "num_devices": jax.device_count(), "num_processes": jax.process_count(),
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "fingerprint": self.fingerprint, "fingerprint_fields": self.fingerprint_fields,
        "architecture": fingerprint_lib.architecture(config), "layer_order": list(layer_order),
        "train_flops_per_step": train_flops_per_step, "flops_per_example": flops_per_example,
        **self.inference, **self.lineage,
    }

  def checkpoint_meta(self, step: int, best: Dict[str, Any], divergence: Dict[str, Any]) -> Dict[str, Any]:
    return {**self.identity, "step": step, "pipeline": {"seed": self.config.seed, "next_step": step},
            "fingerprint": self.config_hash, "fingerprint_fields": self.fingerprint_fields,
            "dataset": self.info.name, "best": best, "num_processes": jax.process_count(),
            "config": self.config.to_json_best_effort(), "divergence": divergence, "lineage": self.lineage,
            "inference": self.inference}

  def summary(self, *, params: int, flops_per_example: float, step: int, final: Dict[str, Any],
              best: Dict[str, Any], train_img_per_s: Optional[float], wall_s: float,
              diverged: Optional[Dict[str, Any]], train_eval: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The run's result: final and best eval, speed, and where it ran. `best` is the best eval before the
    final one ({'top1': -1} if none)."""
    final_is_best = best["top1"] < final["top1"]
    summary = {
        "model": self.config.model, "dataset": self.info.name, "params": params,
        "gflops_per_image": flops_per_example / 1e9, "final_top1": final["top1"], "final_top5": final["top5"],
        "final_loss": final["loss"], "best_top1": final["top1"] if final_is_best else best["top1"],
        "best_top5": final["top5"] if final_is_best else best["top5"],
        "best_step": step if final_is_best or best.get("step") is None else best["step"],
        "steps": step, "eval_examples": final["count"], "train_img_per_s": train_img_per_s, "wall_s": wall_s,
        "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
        "fingerprint": self.fingerprint, "diverged": diverged, **self.lineage,
    }
    if train_eval is not None:
      summary.update(train_eval_split=self.config.eval_train_split, train_eval_top1=train_eval["top1"],
                     train_eval_loss=train_eval["loss"], gap_top1=train_eval["top1"] - final["top1"])
    return summary


def identity(config, num_classes: int) -> Dict[str, Any]:
  """The fields a checkpoint must match to be resumed by `config` (checkpoint.IDENTITY_FIELDS)."""
  return {"model": config.model, "num_classes": num_classes, "model_kwargs": config.model_kwargs.to_dict(),
          "image_size": config.image_size}


def fresh_lineage() -> Dict[str, Any]:
  """The lineage of a run that starts afresh: no config changes, no rewinds (checkpoint.restore_latest
  returns the one a resumed run carries on)."""
  return {"config_changes": [], "rewinds": []}
