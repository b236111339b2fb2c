"""Models: the second-opinion network, its training, evaluation, bundles and prediction.

Training (``train`` orchestrates; each step in its own module):

- ``train``: ``train_model`` (from a store), ``fit_on_indices``, ``fit_with_inner_split``.
- ``config``: ``TrainConfig``, every setting that decides the weights.
- ``sample_sets``: findings, input-gate and severity samples; gate images per fold.
- ``pools``: images in memory (``Pool``) and each epoch's mix of them.
- ``loop``: losses, augmentation, optimiser, schedule, EMA, early stopping.
- ``calibration``: temperature per label, Youden operating points, validation report.
- ``severity_head``: the ridge on pooled features written into the severity head.
- ``severity``: ridge, conformal intervals and the reference protocol (numpy only).
- ``provenance``: what training records in model.json.
- ``trained``: ``TrainedModel``: predict, save a bundle, load one back.
- ``network``: the small CNN, pluggable backbones and the shared heads.
- ``gate_data``: drawn pictures that are not chest X-rays, for the gate.

Evaluation:

- ``evaluate``: patient-grouped cross-validation, held-out sources, the audit, in one run.
- ``eval_fit``: what evaluation needs from training, and the real fit.
- ``eval_pixels``: images and masks for evaluation, batched prediction.
- ``eval_report``: the evaluation report and its JSON document.
- ``eval_severity``: the severity protocol of Cohen et al. 2020.
- ``metrics``: metrics with patient-level bootstrap intervals.
- ``audit``: shortcut audit (does the model still see the finding without the lungs).

Bundles and prediction:

- ``bundle``: the bundle folder and model.json; ``card``: MODEL_CARD.md.
- ``onnx_export``: the network as ONNX; ``runtime``: prediction without torch.
- ``predict``: prediction with torch; ``engines``: choosing an engine, ``predict()``.
- ``gate``: is this a usable frontal chest X-ray; ``saliency``: CAM and Grad-CAM heatmaps.
"""
