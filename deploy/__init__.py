"""Deployment: runtimes the searches decode with (PyTorch, ONNX Runtime, ensembles), ONNX export, model folders.

    deploy.runtime      CaptionRuntime: TorchRuntime, OrtRuntime (+ OrtStepper), EnsembleRuntime
    deploy.onnx_export  export a captioner to an encoder graph and a decoder-step graph, checked and run once
    deploy.folder       shareable model folders (config.json, vocab.json, model.safetensors, README.md model card)
    deploy.loading      any source (checkpoint, official file + vocab, folder, ONNX folder, or a list) -> a runtime

onnx and onnxruntime are imported only when an ONNX graph is written or run.
"""
