"""The bundled trained drafters, shipped as package data (`specray.drafters`): one directory each
of config.json + model.safetensors (+ calibration.json)."""
