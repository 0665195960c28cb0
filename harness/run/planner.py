"""Expand a validated suite into cells, checking everything that can be checked before any model
is loaded: backend and measurement names, variant and measurement parameters, variant vs model
shapes (e.g. a group size that does not divide a layer width), and backend availability."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from harness.adapters import get_adapter
from harness.errors import HarnessError
from harness.metrics import get_measurement
from harness.models.zoo import model_fingerprint, model_shapes, resolve_model
from harness.run.suite import CellSpec, Suite, cell_id_for, explain_validation


@dataclass
class Plan:
    suite: Suite
    device: str
    cells: list[CellSpec]
    unavailable: dict[str, str] = field(default_factory=dict)  # cell_id -> reason
    models: dict[str, dict] = field(default_factory=dict)  # model name -> description


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise HarnessError("device 'cuda' was asked for but torch sees no CUDA device (use --device cpu)")
    return requested


def _validated_measurements(suite: Suite) -> list[dict]:
    out = []
    for i, spec in enumerate(suite.measurements):
        measurement = get_measurement(spec.name)
        try:
            params = measurement.Params.model_validate(spec.params())
        except ValidationError as exc:
            raise explain_validation(exc, measurement.Params, f"suite '{suite.name}': measurements[{i}] ({spec.name})") from None
        out.append({"name": spec.name, **params.model_dump()})
    return out


def plan(suite: Suite, models: list[str] | None = None, backends: list[str] | None = None,
         device: str | None = None) -> Plan:
    device = resolve_device(device or suite.device)
    if suite.hardware:
        from harness.hardware import profiles

        if suite.hardware not in profiles():
            from harness.errors import unknown

            raise HarnessError(f"suite '{suite.name}': {unknown('hardware profile', suite.hardware, profiles())}")
    measurements = _validated_measurements(suite)
    specs = suite.backends
    if backends:
        known = {b.name for b in specs}
        for name in backends:
            if name not in known:
                from harness.errors import unknown

                raise unknown(f"backend in suite '{suite.name}'", name, known)
        specs = [b for b in specs if b.name in backends]

    # parse every variant before touching any model
    parsed = []
    for spec in specs:
        adapter = get_adapter(spec.name)
        for vi, raw in enumerate(spec.variants):
            params = dict(raw)
            label = params.pop("label", None)
            try:
                variant = adapter.parse_variant(params)
            except ValidationError as exc:
                where = f"suite '{suite.name}': backend '{spec.name}' variants[{vi}]"
                raise explain_validation(exc, adapter.Variant, where) from None
            parsed.append((adapter, spec.name, variant, str(label or variant.label()), spec.timeout_s or suite.timeout_s,
                           spec.gpus if device == "cuda" else 1, spec.calibration or suite.calibration))

    _check_corpora(suite, measurements, parsed)
    result = Plan(suite=suite, device=device, cells=[])
    for model_name in models or suite.models:
        source = resolve_model(model_name, prepare=True)
        result.models[source.name] = {**source.describe(), "fingerprint": model_fingerprint(source)}
        shapes = model_shapes(source)
        _check_tasks(suite, source.name, shapes.task, measurements, parsed)
        _check_random_weights(suite, source, measurements, parsed)
        for adapter, backend, variant, label, timeout_s, gpus, calibration_spec in parsed:
            adapter.check(variant, shapes, device)
            calibration = calibration_spec.model_dump() if adapter.variant_needs_calibration(variant) else None
            identity = {
                "model": source.name, "backend": backend, "variant": variant.model_dump(mode="json"),
                "device": device, "measurements": measurements, "calibration": calibration,
                **({"gpus": gpus} if gpus > 1 else {}),  # a model spread over GPUs is another cell (perf)
            }
            cell = CellSpec(
                cell_id=cell_id_for(identity), suite=suite.name, model=source.name, backend=backend,
                variant=label, variant_params=variant.model_dump(mode="json"), device=device,
                measurements=measurements, calibration=calibration, timeout_s=timeout_s,
                gpus=gpus, hardware=suite.hardware, is_reference=suite.reference == f"{backend}:{label}",
            )
            if cell.cell_id in {c.cell_id for c in result.cells}:
                raise HarnessError(f"suite '{suite.name}': variant '{backend}:{label}' appears twice")
            result.cells.append(cell)
            availability = adapter.availability(device)
            if availability.ok:
                availability = adapter.variant_availability(variant, device)
            if not availability.ok:
                result.unavailable[cell.cell_id] = availability.reason
    reference_selected = not backends or (suite.reference or "").split(":")[0] in backends
    if suite.reference and reference_selected and not any(c.is_reference for c in result.cells):
        labels = [f"{c.backend}:{c.variant}" for c in result.cells]
        from harness.errors import did_you_mean

        raise HarnessError(f"suite '{suite.name}': reference '{suite.reference}' is not one of its variants{did_you_mean(suite.reference, labels)}")
    _link_references(result)
    return result


def _check_corpora(suite: Suite, measurements: list[dict], parsed: list) -> None:
    """What every measurement reads (`Measurement.check_inputs`: corpora, task files) and every
    calibrated variant's corpus can be had here (files exist, packages are installed), before any
    model loads."""
    # lazy: `import harness.run.planner` stays free of torch
    from harness.models.corpora import check_corpus

    for i, spec in enumerate(measurements):
        measurement = get_measurement(spec["name"])
        try:
            measurement.check_inputs(measurement.Params.model_validate({k: v for k, v in spec.items() if k != "name"}))
        except HarnessError as exc:
            raise HarnessError(f"suite '{suite.name}': measurements[{i}] ({spec['name']}): {exc}") from None
    calibrations = [(backend, calibration.corpus) for adapter, backend, variant, *_, calibration in parsed
                    if adapter.variant_needs_calibration(variant)]
    for backend, corpus in calibrations:
        try:
            check_corpus(corpus)
        except HarnessError as exc:
            raise HarnessError(f"suite '{suite.name}': backend '{backend}' calibration: {exc}") from None


def _check_random_weights(suite: Suite, source, measurements: list[dict], parsed: list) -> None:
    """`shape:` models have random weights (harness.perf.shape_models): speed only. Quality
    measurements and calibrated quantizers (no tokenizer, no real text) are refused in one line."""
    if source.kind != "shape":
        return

    quality = [m["name"] for m in measurements
               if get_measurement(m["name"]).needs_real_weights or get_measurement(m["name"]).needs_tokenizer]
    if quality:
        raise HarnessError(f"suite '{suite.name}': model '{source.name}' has random-init weights (speed only); "
                           f"quality measurement(s) {', '.join(quality)} need real weights: use a real model or drop them")
    calibrated = [backend for adapter, backend, variant, *_ in parsed if adapter.variant_needs_calibration(variant)]
    if calibrated:
        raise HarnessError(f"suite '{suite.name}': model '{source.name}' has random-init weights and no tokenizer; "
                           f"calibrated backend(s) {', '.join(sorted(set(calibrated)))} need real text and weights")


def _check_tasks(suite: Suite, model: str, task: str, measurements: list[dict], parsed: list) -> None:
    """One line when a backend or measurement cannot handle this kind of model (e.g. perplexity
    on a sentence encoder), before any model loads."""
    for spec in measurements:
        tasks = get_measurement(spec["name"]).tasks
        if task not in tasks:
            raise HarnessError(f"suite '{suite.name}': measurement '{spec['name']}' does not apply to {task} model "
                               f"'{model}' (it measures {', '.join(tasks)} models)")
    for adapter, backend, *_ in parsed:
        if task not in adapter.tasks:
            raise HarnessError(f"suite '{suite.name}': backend '{backend}' does not support {task} model '{model}' "
                               f"(it handles {', '.join(adapter.tasks)} models)")


def _link_references(result: Plan) -> None:
    """Run each model's reference cell first and point the model's other cells at it, so their
    measurements can pair their per-token values with the reference's (same tokens)."""
    refs = {c.model: c for c in result.cells if c.is_reference}
    linked = [
        c if c.is_reference or c.model not in refs else c.model_copy(update={
            "reference_cell_id": refs[c.model].cell_id,
            "reference": {"backend": refs[c.model].backend, "variant_params": refs[c.model].variant_params},
        })
        for c in result.cells
    ]
    result.cells = sorted(linked, key=lambda c: not c.is_reference)
