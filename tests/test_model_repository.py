"""The model repository's configs, production (GPU) and the derived CPU flavour: they parse with
tritonclient's model_config_pb2, use exactly the names, types and shapes of ssd_common.io,
wire the ensemble consistently, and the two flavours agree."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from ssd_common import io
from ssd_train.models.ssd300.boxes import MAX_DETECTIONS, TOPK_PER_CLASS
from ssd_train.export import PACKAGE_REPOSITORY
from ssd_train.serving import served_repository
from ssd_train.serving.image_check import ImageLimits
from ssd_train.serving.served_repository import (ConfigError, derive_repository, interface_difference, model_kind,
                                                 read_config)

FP32, INT32, INT64, UINT8, BYTES = mc.TYPE_FP32, mc.TYPE_INT32, mc.TYPE_INT64, mc.TYPE_UINT8, mc.TYPE_STRING
SIZE = io.INPUT_SIZE
DETECTIONS = [
    (io.DETECTION_BOXES, FP32, [MAX_DETECTIONS, 4]),
    (io.DETECTION_SCORES, FP32, [MAX_DETECTIONS]),
    (io.DETECTION_CLASSES, INT32, [MAX_DETECTIONS]),
    (io.NUM_DETECTIONS, INT32, [1]),
]
TOPK = TOPK_PER_CLASS
MODEL_IO = (
    [(io.MODEL_INPUT, FP32, [3, SIZE, SIZE])],
    [(io.MODEL_BOXES, FP32, [-1, TOPK, 4]), (io.MODEL_SCORES, FP32, [-1, TOPK])],
)
# (inputs, outputs) of each model: (name, type, dims) in config order.
SIGNATURES = {
    io.VALIDATE: ([(io.IMAGE, UINT8, [-1])], [(io.VALID_IMAGE, UINT8, [-1])]),
    io.PREPROCESS: ([(io.IMAGE, UINT8, [-1])],
                    [(io.PREPROCESSED_IMAGE, FP32, [3, SIZE, SIZE]), (io.IMAGE_SIZE, INT32, [2])]),
    io.MODEL_FP32: MODEL_IO,
    io.MODEL_FP16: MODEL_IO,
    io.POSTPROCESS: ([(io.CANDIDATE_BOXES, FP32, [-1, TOPK, 4]), (io.CANDIDATE_SCORES, FP32, [-1, TOPK]),
                      (io.IMAGE_SIZE, INT32, [2])],
                     DETECTIONS),
    io.ENSEMBLE: ([(io.IMAGE, UINT8, [-1])], DETECTIONS),
}
# Mask R-CNN's: K detections per image, M x M masks
K, M = io.MASKRCNN_MAX_DETECTIONS, io.MASKRCNN_MASK_SIZE
MASKRCNN_RAW = [(FP32, [K, 4]), (FP32, [K]), (INT64, [K]), (FP32, [K, M, M]), (INT64, [1])]
MASKRCNN_DETECTIONS = [(io.DETECTION_BOXES, FP32, [K, 4]), (io.DETECTION_SCORES, FP32, [K]),
                       (io.DETECTION_CLASSES, INT32, [K]), (io.NUM_DETECTIONS, INT32, [1]),
                       (io.DETECTION_MASKS, BYTES, [K])]
SIGNATURES.update({
    io.MASKRCNN_PREPROCESS: ([(io.IMAGE, UINT8, [-1])], [(io.PREPROCESSED_IMAGE, FP32, [3, -1, -1]),
                                                          (io.RESIZED_SIZE, INT64, [2]), (io.IMAGE_SIZE, INT32, [2])]),
    io.MASKRCNN_MODEL: (list(zip(io.MASKRCNN_LIBTORCH_INPUTS, (FP32, INT64), ([3, -1, -1], [2]))),
                        [(name, *tensor) for name, tensor in zip(io.MASKRCNN_LIBTORCH_OUTPUTS, MASKRCNN_RAW)]),
    io.MASKRCNN_POSTPROCESS: ([(name, *tensor) for name, tensor in zip(io.MASKRCNN_MODEL_OUTPUTS, MASKRCNN_RAW)]
                              + [(io.RESIZED_SIZE, INT64, [2]), (io.IMAGE_SIZE, INT32, [2])], MASKRCNN_DETECTIONS),
    io.MASKRCNN_ENSEMBLE: ([(io.IMAGE, UINT8, [-1])], MASKRCNN_DETECTIONS + [(io.IMAGE_SIZE, INT32, [2])]),
})
KINDS = {io.VALIDATE: "python", io.PREPROCESS: "dali", io.MODEL_FP32: "pytorch_libtorch", io.MODEL_FP16: "pytorch_libtorch",
         io.POSTPROCESS: "python", io.ENSEMBLE: "ensemble", io.MASKRCNN_PREPROCESS: "dali",
         io.MASKRCNN_MODEL: "pytorch_libtorch", io.MASKRCNN_POSTPROCESS: "python", io.MASKRCNN_ENSEMBLE: "ensemble"}
ENSEMBLES = (io.ENSEMBLE, io.MASKRCNN_ENSEMBLE)


def signature(config) -> tuple[list, list]:
    return ([(t.name, t.data_type, list(t.dims)) for t in config.input],
            [(t.name, t.data_type, list(t.dims)) for t in config.output])


def configs(repository: Path) -> dict:
    return {name: read_config(repository / name / "config.pbtxt") for name in io.ALL_MODELS
            if (repository / name / "config.pbtxt").exists()}


@pytest.fixture(scope="module")
def production():
    return configs(PACKAGE_REPOSITORY)


def fake_export(tmp_path: Path, precisions=("fp32", "fp16")) -> Path:
    """A copy of the production repository with placeholder artifacts (derivation only links them)."""
    repository = tmp_path / "production"
    shutil.copytree(PACKAGE_REPOSITORY, repository, ignore=shutil.ignore_patterns("*.pt", "*.json", "__pycache__"))
    for precision in precisions:
        (repository / io.model_name(precision) / "1").mkdir(parents=True, exist_ok=True)
        (repository / io.model_name(precision) / "1" / io.TORCHSCRIPT_FILE).write_bytes(precision.encode())
    (repository / io.POSTPROCESS / "1" / io.LABELS_FILE).write_text("[]")
    (repository / io.MASKRCNN_MODEL / "1").mkdir(exist_ok=True)
    (repository / io.MASKRCNN_MODEL / "1" / io.TORCHSCRIPT_FILE).write_bytes(b"maskrcnn")
    (repository / io.MASKRCNN_POSTPROCESS / "1" / io.LABELS_FILE).write_text("[]")
    (repository / io.MASKRCNN_PREPROCESS / "1" / io.RESIZE_FILE).write_text("{}")
    return repository


@pytest.fixture(scope="module")
def cpu(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_flavour")
    production = fake_export(tmp)
    target = tmp / "cpu"
    names = derive_repository(production, target, "cpu", io.ALL_MODELS)
    return production, target, names, configs(target)


def test_repository_holds_exactly_the_io_models():
    assert sorted(p.name for p in PACKAGE_REPOSITORY.iterdir() if p.is_dir()) == sorted(io.ALL_MODELS)
    assert io.ALL_MODELS == (*io.MODELS, *io.MASKRCNN_MODELS[1:])  # the image check is shared


@pytest.mark.parametrize("name", io.ALL_MODELS)
def test_production_config_uses_io_names_types_and_shapes(production, name):
    config = production[name]
    assert config.name == name
    assert model_kind(config) == KINDS[name]
    assert signature(config) == SIGNATURES[name]
    if name in io.MODELS:
        assert config.max_batch_size == io.MAX_BATCH_SIZE >= 64
    else:
        assert config.max_batch_size == io.MASKRCNN_MAX_BATCH_SIZE


@pytest.mark.parametrize("name", [n for n in io.ALL_MODELS if n not in ENSEMBLES])
def test_production_models_batch_dynamically_on_the_gpu(production, name):
    config = production[name]
    assert config.HasField("dynamic_batching")
    # The image check is CPU work (header parsing): no GPU instance for it.
    kind = mc.ModelInstanceGroup.KIND_CPU if name == io.VALIDATE else mc.ModelInstanceGroup.KIND_GPU
    assert [g.kind for g in config.instance_group] == [kind]


@pytest.mark.parametrize("name", [io.VALIDATE, io.PREPROCESS, io.MASKRCNN_PREPROCESS])
def test_image_steps_batch_images_of_different_lengths(production, name):
    (image,) = production[name].input
    assert image.allow_ragged_batch


@pytest.mark.parametrize("name", [io.POSTPROCESS, io.MASKRCNN_POSTPROCESS])
def test_postprocess_takes_tensors_where_they_are(production, name):
    parameters = production[name].parameters
    assert parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"


def ensemble_wiring(all_configs: dict, name: str = io.ENSEMBLE) -> list[str]:
    """Walk the ensemble's steps checking each mapping against the models' own signatures and batch
    sizes; returns the step models in order."""
    ensemble = all_configs[name]
    tensors = {t.name: (t.data_type, list(t.dims)) for t in ensemble.input}
    steps = []
    for step in ensemble.ensemble_scheduling.step:
        model = all_configs[step.model_name]
        assert ensemble.max_batch_size <= model.max_batch_size, step.model_name
        inputs = {t.name: (t.data_type, list(t.dims)) for t in model.input}
        outputs = {t.name: (t.data_type, list(t.dims)) for t in model.output}
        assert set(step.input_map) == set(inputs), step.model_name
        for model_input, tensor in step.input_map.items():
            assert tensors[tensor] == inputs[model_input], (step.model_name, model_input)
        assert set(step.output_map) <= set(outputs)
        for model_output, tensor in step.output_map.items():
            assert tensor not in tensors, f"{tensor} produced twice"
            tensors[tensor] = outputs[model_output]
        steps.append(step.model_name)
    for output in ensemble.output:
        assert tensors[output.name] == (output.data_type, list(output.dims))
    return steps


def test_production_ensemble_wiring_runs_fp16(production):
    assert ensemble_wiring(production) == [io.VALIDATE, io.PREPROCESS, io.MODEL_FP16, io.POSTPROCESS]


def test_production_maskrcnn_wiring_shares_the_image_check(production):
    assert ensemble_wiring(production, io.MASKRCNN_ENSEMBLE) == list(io.MASKRCNN_MODELS[:-1])
    assert io.ENSEMBLES[io.MASKRCNN_ENSEMBLE][0] == io.VALIDATE


@pytest.mark.parametrize("name", [io.PREPROCESS, io.MASKRCNN_PREPROCESS])
def test_dali_model_has_exactly_one_autoserialize_pipeline(name, tmp_path):
    """What the DALI backend does at load time, up to serialisation (which needs a GPU)."""
    from nvidia.dali._utils.autoserialize import _discover_autoserialize

    source = PACKAGE_REPOSITORY / name / "1" / "dali.py"
    if name == io.MASKRCNN_PREPROCESS:  # it reads the sizes export writes beside it
        shutil.copy(source, tmp_path / "dali.py")
        (tmp_path / io.RESIZE_FILE).write_text('{"min_size": 800, "max_size": 1333}')
        source = tmp_path / "dali.py"
    spec = importlib.util.spec_from_file_location(f"{name}_dali_model", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert [f.__name__ for f in _discover_autoserialize(module, visited=[])] == [name]
    if name == io.MASKRCNN_PREPROCESS:
        assert (module.MIN_SIZE, module.MAX_SIZE) == (800, 1333)


@pytest.mark.cuda
def test_dali_model_autoserializes_and_runs_on_gpu(tmp_path):
    pytest.importorskip("nvidia.dali")
    import numpy as np
    import torch
    from nvidia.dali import Pipeline
    from nvidia.dali._utils.autoserialize import invoke_autoserialize

    from ssd_train.export import sample_images

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    spec = importlib.util.spec_from_file_location("ssd300_dali_model", PACKAGE_REPOSITORY / io.PREPROCESS / "1" / "dali.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    invoke_autoserialize(module, str(tmp_path / io.DALI_FILE))
    pipe = Pipeline.deserialize(filename=str(tmp_path / io.DALI_FILE), device_id=0)
    pipe.build()
    pipe.feed_input(io.IMAGE, [np.frombuffer(b, np.uint8) for b in sample_images()])
    images, sizes = pipe.run()
    assert images.as_cpu().as_array().shape == (2, 3, SIZE, SIZE)
    assert sizes.as_array().tolist() == [[480, 640], [375, 260]]


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "config.pbtxt"
    bad.write_text('name: "x"\nbackend: "python"\nmax_batch_sise: 4\n')
    with pytest.raises(ConfigError, match="not a valid model config"):
        read_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        read_config(tmp_path / "missing.pbtxt")


def edited(config, edit):
    copy = mc.ModelConfig()
    copy.CopyFrom(config)
    edit(copy)
    return copy


def test_the_interface_is_tensors_and_wiring_the_rest_is_tuning(production):
    model, ensemble = production[io.MODEL_FP32], production[io.ENSEMBLE]

    def difference(config, edit):
        return interface_difference(edited(config, edit), config)

    assert difference(model, lambda c: setattr(c.instance_group[0], "count", 4)) is None
    assert difference(model, lambda c: setattr(c, "max_batch_size", 16)) is None
    assert difference(model, lambda c: setattr(c.dynamic_batching, "max_queue_delay_microseconds", 20000)) is None
    assert difference(model, lambda c: c.dynamic_batching.preferred_batch_size.append(8)) is None
    assert difference(model, lambda c: c.parameters["ENABLE_NVFUSER"].MergeFrom(
        mc.ModelParameter(string_value="no"))) is None
    assert difference(model, lambda c: c.output[0].ClearField("dims") or c.output[0].dims.extend([4, 8732])) == (
        f"declares output {io.MODEL_BOXES} as FP32 [4, 8732] where this ssd-train's has FP32 [-1, {TOPK}, 4]")
    assert difference(model, lambda c: c.output[0].reshape.shape.append(1)) == (
        f"declares output {io.MODEL_BOXES} otherwise than this ssd-train's")
    assert difference(model, lambda c: c.output.pop()) == f"has no output {io.MODEL_SCORES}"
    assert difference(model, lambda c: c.input.add(name="EXTRA")) == "has an input EXTRA that this ssd-train's does not"
    assert difference(model, lambda c: setattr(c, "platform", "onnxruntime_onnx")) == "has another platform"
    assert difference(ensemble, lambda c: setattr(c.ensemble_scheduling.step[2], "model_name", io.MODEL_FP32)) == (
        "wires its steps differently")


@pytest.mark.parametrize("case", ["older config", "older code", "missing code"])
def test_serving_refuses_the_configs_and_code_of_another_ssd_train(tmp_path, case):
    """What an older ssd-train's export left would fail inside the server (a module it imports moved, a
    tensor the model no longer gives); ssd-serve says so in one line instead."""
    production = fake_export(tmp_path)
    if case == "older config":  # and older code, as an older export leaves both: the config is named first
        config = production / io.MODEL_FP32 / "config.pbtxt"
        config.write_text(config.read_text().replace(f"dims: [ -1, {TOPK}, 4 ]", "dims: [ 4, 8732 ]"))
        (production / io.PREPROCESS / "1" / "dali.py").write_text("# an older pipeline\n")
        expected = re.escape(f"{config} declares output {io.MODEL_BOXES} as FP32 [4, 8732] ") + ".* --replace-configs"
    elif case == "older code":
        code = production / io.POSTPROCESS / "1" / "model.py"
        code.write_text("from ssd_train.boxes import postprocess\n")
        expected = re.escape(f"{code} is not this ssd-train's ") + ".* export again"
    else:
        code = production / io.PREPROCESS / "1" / "dali.py"
        code.unlink()
        expected = re.escape(f"{code} is missing: run this ssd-train's export again")
    with pytest.raises(ConfigError, match=expected) as error:
        derive_repository(production, tmp_path / "cpu", "cpu")
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------
# CPU flavour


@pytest.mark.parametrize("name", io.ALL_MODELS)
def test_cpu_flavour_agrees_with_production(production, cpu, name):
    _, _, _, cpu_configs = cpu
    derived, original = cpu_configs[name], production[name]
    assert derived.name == name
    assert signature(derived) == signature(original) == SIGNATURES[name]
    assert derived.max_batch_size == original.max_batch_size
    assert derived.dynamic_batching == original.dynamic_batching
    assert [i.allow_ragged_batch for i in derived.input] == [i.allow_ragged_batch for i in original.input]
    if name in ENSEMBLES:
        assert model_kind(derived) == "ensemble"
    else:
        assert model_kind(derived) == "python"
        assert [g.kind for g in derived.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]


def test_cpu_flavour_ensemble_runs_fp32(cpu):
    _, _, names, cpu_configs = cpu
    assert names[-2:] == [io.ENSEMBLE, io.MASKRCNN_ENSEMBLE] and sorted(names) == sorted(io.ALL_MODELS)
    assert ensemble_wiring(cpu_configs) == [io.VALIDATE, io.PREPROCESS, io.MODEL_FP32, io.POSTPROCESS]
    assert ensemble_wiring(cpu_configs, io.MASKRCNN_ENSEMBLE) == list(io.MASKRCNN_MODELS[:-1])


def test_cpu_flavour_reuses_production_code_and_weights(cpu):
    production, target, _, _ = cpu
    for name in (io.MODEL_FP32, io.MODEL_FP16):
        assert (target / name / "1" / io.TORCHSCRIPT_FILE).resolve() == (production / name / "1" / io.TORCHSCRIPT_FILE).resolve()
    for name, file in ((io.POSTPROCESS, "model.py"), (io.POSTPROCESS, io.LABELS_FILE), (io.VALIDATE, "model.py"),
                       (io.MASKRCNN_MODEL, io.TORCHSCRIPT_FILE), (io.MASKRCNN_PREPROCESS, io.RESIZE_FILE),
                       (io.MASKRCNN_POSTPROCESS, "model.py"), (io.MASKRCNN_POSTPROCESS, io.LABELS_FILE)):
        assert (target / name / "1" / file).resolve() == (production / name / "1" / file).resolve()
    # Generated model.py files import an existing class of cpu_models (which imports only in a stub).
    classes = {node.name for node in ast.parse(Path(served_repository.__file__).with_name("cpu_models.py").read_text()).body
               if isinstance(node, ast.ClassDef)}
    for name in (io.PREPROCESS, io.MODEL_FP32, io.MODEL_FP16, io.MASKRCNN_PREPROCESS, io.MASKRCNN_MODEL):
        (statement,) = [n for n in ast.parse((target / name / "1" / "model.py").read_text()).body]
        assert statement.module == "ssd_train.serving.cpu_models"
        assert statement.names[0].name in classes and statement.names[0].asname == "TritonPythonModel"


def test_cpu_flavour_leaves_out_models_without_weights(tmp_path):
    production = fake_export(tmp_path, precisions=("fp32",))
    names = derive_repository(production, tmp_path / "cpu", "cpu")
    assert names == [io.VALIDATE, io.PREPROCESS, io.MODEL_FP32, io.POSTPROCESS, io.ENSEMBLE]
    assert not (tmp_path / "cpu" / io.MODEL_FP16).exists()



# ----------------------------------------------------------------------------------------------
# GPU flavour and operator settings


def test_gpu_flavour_keeps_production_configs_and_links_their_files(production, tmp_path):
    source = fake_export(tmp_path, precisions=("fp16",))
    (source / io.POSTPROCESS / "1" / "model.py.previous").write_text("# what an export replaced\n")
    target = tmp_path / "gpu"
    names = derive_repository(source, target, "gpu")
    assert names == [io.VALIDATE, io.PREPROCESS, io.MODEL_FP16, io.POSTPROCESS, io.ENSEMBLE]  # no fp32 weights
    derived = configs(target)
    for name in names:
        assert derived[name] == production[name], name
    for name, file in ((io.PREPROCESS, "dali.py"), (io.MODEL_FP16, io.TORCHSCRIPT_FILE), (io.POSTPROCESS, "model.py")):
        assert (target / name / "1" / file).resolve() == (source / name / "1" / file).resolve()
    assert not list(target.rglob("*.previous"))  # kept for the operator, not served


@pytest.mark.parametrize("flavour", ["gpu", "cpu"])
def test_image_limits_reach_the_validate_config(tmp_path, flavour):
    limits = ImageLimits(max_pixels=1234, max_image_bytes=5678, max_request_bytes=91011)
    target = tmp_path / flavour
    derive_repository(fake_export(tmp_path), target, flavour, parameters={io.VALIDATE: limits.as_parameters()})
    parameters = read_config(target / io.VALIDATE / "config.pbtxt").parameters
    as_json = {key: {"string_value": value.string_value} for key, value in parameters.items()}
    assert ImageLimits.from_parameters(as_json) == limits
