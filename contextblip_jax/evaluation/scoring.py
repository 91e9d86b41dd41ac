"""The jitted IMAGECODE scoring step: a batch of whole image sets -> scores [L, D, 10].

Each set's 10 candidates go through the vision tower once (`ContextBlip.encode_candidates`),
their image-side cross-attention keys/values of every text layer are computed once
(`ContextBlip.candidate_cross_kv`), and each of the set's D descriptions then costs only its
text pass (`ContextBlip.cached_candidate_scores`), in one jitted, sharded step per batch.
The scores equal `candidate_scores` of each description (tests/test_cross_kv_cache.py).
Heads (`ContextBlip.SCORE_HEADS`): 'zero_shot' (ITM match probability), 'stage1', 'stage2'
(fine-tuned logits). `head_params` picks the parameter groups a head reads and
`param_shardings_for` their shardings from the model's logical axis names.
(The scoring command for a few image files is `scorer.py`; the benchmarks in bench/ time
`score_batch` itself.)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from contextblip_jax.models.contextblip import ContextBlip, init_params
from contextblip_jax.parallel import sharding as shd

HEADS = ContextBlip.SCORE_HEADS


def score_batch(params, batch, *, model: ContextBlip, head: str):
  """Scores of a set batch; each set's vision features and cross-attention keys/values
  computed once and shared by its D descriptions.

  batch: images [L, 10, S, S, 3], input_ids / attention_mask [L, D, T], is_video [L],
  desc_mask [L, D], example_index [L, D], set_mask [L] (`pipeline.imagecode_eval_pipeline`).
  Returns (scores [L, D, 10] float32, {desc_mask, example_index, set_mask}).
  """
  variables = {"params": params}
  embeds = model.apply(variables, batch["images"],
                       method=ContextBlip.encode_candidates)        # [L, 10, N, Dv]
  kv = model.apply(variables, embeds, method=ContextBlip.candidate_cross_kv)  # [L*10, N, H, Dh]
  is_video = batch["is_video"] if head == "stage2" else None
  scores = model.apply(variables, kv, batch["input_ids"], batch["attention_mask"], head,
                       is_video, method=ContextBlip.cached_candidate_scores)  # [L, D, 10]
  meta = {k: batch[k] for k in ("desc_mask", "example_index", "set_mask")}
  return scores.astype(jnp.float32), meta


def make_score_step(model: ContextBlip, head: str, param_shardings: Any, batch_shardings: Any,
                    mesh: jax.sharding.Mesh, rules=None, compiler_options=None):
  """jit(score_batch) with explicit shardings; outputs replicated (small)."""
  if head not in HEADS:
    raise ValueError(f"unknown head {head!r}; known: {HEADS}")
  fn = functools.partial(score_batch, model=model, head=head)
  return jax.jit(shd.with_mesh_rules(fn, mesh, rules),
                 in_shardings=(param_shardings, batch_shardings),
                 out_shardings=shd.replicated(mesh), compiler_options=compiler_options)


def head_params(params: dict[str, Any], model: ContextBlip, head: str) -> dict[str, Any]:
  """The parameter groups a head reads (others are not passed to the step)."""
  names = ["pretrained_blip"]
  if model.config.use_adapter:
    names.append("vision_adapter")
  if head in ("stage1", "stage2"):
    names.append("prediction_layer")
  if head == "stage2":
    names.append("context_encoder")
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(f"head {head!r} needs parameter groups {missing}, which the checkpoint "
                     f"does not hold (it has {sorted(params)})")
  return {n: params[n] for n in names}


def param_shardings_for(model: ContextBlip, params: dict[str, Any], mesh, rules=None):
  """Shardings of `params` (a subset of the model's groups) from the logical axis names."""
  boxed = jax.eval_shape(lambda r: init_params(model, r, "all"), jax.random.PRNGKey(0))
  all_sh = shd.param_shardings(boxed, mesh, rules)
  return {k: all_sh[k] for k in params}
