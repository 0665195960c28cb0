"""Quality measurements, registered lazily by name."""

from __future__ import annotations

from harness.registry import Registry

MEASUREMENTS: Registry = Registry(
    "measurement",
    {
        "perplexity": "harness.metrics.perplexity:Perplexity",
        "divergence": "harness.metrics.divergence:Divergence",
        "training": "harness.metrics.training:Training",
        "kv-cache": "harness.metrics.kvcache:KVCache",
        "tasks": "harness.metrics.tasks:Tasks",
        "lm-eval": "harness.metrics.lm_eval_bridge:LmEval",
        "drift": "harness.metrics.drift:Drift",
        "outliers": "harness.metrics.outliers:Outliers",
        "sensitivity": "harness.metrics.sensitivity:Sensitivity",
        "embedding": "harness.metrics.embedding:EmbeddingQuality",
        "encoder-speed": "harness.metrics.encoder_speed:EncoderSpeed",
        "classification": "harness.metrics.classification:Classification",
        "vision-speed": "harness.metrics.vision_speed:VisionSpeed",
        "model-size": "harness.metrics.model_size:ModelSize",
        # performance (harness.perf): no trained weights needed, so they also run on shape: models
        "ceilings": "harness.perf.measurements:Ceilings",
        "speed": "harness.perf.measurements:Speed",
        "memory": "harness.perf.measurements:Memory",
    },
)


def get_measurement(name: str):
    return MEASUREMENTS.get(name)()
