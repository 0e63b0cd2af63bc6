"""Inference: run a trained model on films, with either backend, and explain or export it.

Modules, each importing only those before it (a test checks there is no import circle in `pneumolab`):

* `card`: the model card (`ModelCard`, format checked on read), the gate's arrays file, the bundled model's folder;
* `steps`: `InferenceModel`, what both backends share (preprocessing, TTA views, calibration, the input gate,
  `decide`), and `Decision`;
* `pytorch`: `TrainedModel` and `load_trained` (run folder, artefact, checkpoint, bundled model);
* `files`: `collect_image_paths` and `predict_files` (any backend);
* `explain`: Grad-CAM (PyTorch);
* `export`: the artefact (safetensors + card) and ONNX export, checked against PyTorch;
* `onnx`: `OnnxModel` (onnxruntime) and `load_onnx`;
* `ensemble`: `EnsembleModel` (members on any backend, the combiner, its own operating point), its artefact;
* `loader`: `load_backend`, the one entry point for either backend and for ensembles.

Submodules are imported where used (``from pneumolab.inference.pytorch import load_trained``): this file imports
none of them, so a command pays only for what it runs.
"""
