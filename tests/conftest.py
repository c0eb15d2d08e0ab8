"""Shared test helpers and tiers.

Tests that need the real data read it from $PATCHCORE_SHARED (the `shared` folder holding
data/ and reference/); they skip with that reason when it is unset. CI sets it.

Markers (pyproject.toml): `real_data` (tests/test_real_data.py: 2-4 minutes each) and `slow`
(those and every test that took 10 s or more here, listed below), so that
`pytest -m "not slow"` is a quick loop while editing.
"""
import os

# Several JAX processes share one accelerator here (two pytest workers, the launcher and
# multi-process tests in subprocesses): none may take 75 % of its memory up front. Set before
# any test module imports jax, and inherited by every subprocess.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image
import pytest


def shared_path(*parts):
  """Path under $PATCHCORE_SHARED, or skip the test saying why."""
  root = os.environ.get('PATCHCORE_SHARED')
  if not root:
    pytest.skip('needs the real data: set PATCHCORE_SHARED to the folder holding data/ and '
                'reference/ (CI sets it)')
  path = os.path.join(root, *parts)
  if not os.path.exists(path):
    pytest.fail(f'PATCHCORE_SHARED is set but {path} does not exist')
  return path


def write_image(path, array, **kwargs):
  """Saves a uint8 array as an image file (format from the extension), making its folder."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def write_tiny_folder(root, rng, *, ext='.png', size=(40, 56)):
  """A tiny MVTec-layout folder: 5 train, 2 good + 3 'crack' test images, 2 of them masked."""
  for i in range(5):
    write_image(os.path.join(root, 'train', 'good', f'{i:03d}{ext}'),
                rng.integers(0, 256, size + (3,), dtype=np.uint8))
  for i in range(2):
    write_image(os.path.join(root, 'test', 'good', f'{i:03d}{ext}'),
                rng.integers(0, 256, size + (3,), dtype=np.uint8))
  for i in range(3):
    write_image(os.path.join(root, 'test', 'crack', f'{i:03d}{ext}'),
                rng.integers(0, 256, size + (3,), dtype=np.uint8))
    if i < 2:
      mask = np.zeros(size, np.uint8)
      mask[5:15, 10:30] = 255
      write_image(os.path.join(root, 'ground_truth', 'crack', f'{i:03d}_mask.png'), mask)
  return root


# Tests that took 10 s or more on 2 cores (pytest --durations, two workers).
SLOW = (
    'test_backbones.py::test_matches_torchvision[densenet201]',  # 60 s
    'test_multihost.py::test_two_processes_fit_and_score_as_one',  # 33 s
    'test_sharded.py::test_four_devices',  # 29 s (the module's checks, in a 4-device process)
    'test_benchmark.py::test_benchmark_job_through_the_launcher',  # 46 s
    'test_backbones.py::test_fold_batchnorm_keeps_outputs[wide_resnet50_2]',  # 44 s
    'test_backbones.py::test_matches_torchvision[resnet152]',  # 39 s
    'test_backbones.py::test_torchvision_files_load_with_their_classifier[vgg16]',  # 36 s
    'test_notebook.py::test_quickstart_notebook_runs',  # 35 s
    'test_backbones.py::test_matches_torchvision[resnet101]',  # 26 s
    'test_backbones.py::test_matches_torchvision[wide_resnet101_2]',  # 26 s
    'test_backbones.py::test_matches_torchvision[vgg19]',  # 25 s
    'test_experiment.py::test_launcher_runs_the_demo_end_to_end',  # 24 s
    'test_backbones.py::test_matches_torchvision[vgg16]',  # 20 s
    'test_backbones.py::test_fold_batchnorm_keeps_outputs[resnet18]',  # 19 s
    'test_benchmark.py::test_every_stage_compiles_once_per_shape',  # 19 s
    'test_backbones.py::test_matches_torchvision[resnet34]',  # 19 s
    'test_inputs.py::test_killed_run_cannot_pass_for_a_finished_one',  # 19 s
    'test_backbones.py::test_matches_torchvision[wide_resnet50_2]',  # 16 s
    'test_layout.py::test_readme_python_example_runs_without_ml_collections',  # 15 s
    'test_backbones.py::test_matches_torchvision[resnet50]',  # 15 s
    'test_experiment.py::test_run_on_a_folder_without_masks',  # 15 s
    'test_tfds_builders.py::test_a_run_from_tfds_equals_the_run_from_files',  # 12 s
    'test_tfds_builders.py::test_folder_dataset_has_the_same_samples_bytes_and_pixels',  # 13 s
    'test_sweep.py::test_a_sweep_writes_every_variant_report_and_plots',  # 13 s
    'test_sweep.py::test_feature_axes_backbone_ensemble_and_ivfpq',  # 16 s
    'test_sweep.py::test_low_shot_banks_and_hierarchies',  # 10 s
    'test_sweep.py::test_several_categories_get_a_mean',  # 15 s
    'test_ivfpq.py::test_recall_as_faiss_at_equal_parameters',  # 8 s (with faiss installed)
    'test_backbones.py::test_matches_torchvision[resnet18]',  # 14 s
    'test_predict_job.py::test_launcher_writes_rows_masks_and_overlays_and_survives_bad_files',
    'test_predict_job.py::test_sigterm_keeps_whole_batches_and_resume_gives_the_uninterrupted_csv',
    'test_predict_job.py::test_a_really_full_disk',  # 13 s
    'test_inputs.py::test_sigint_leaves_an_experiment_interrupted_with_exit_130',  # 11 s
    'test_backbones.py::test_xla_convolutions_give_the_cpu_tuned_outputs[efficientnet_lite0]',
    'test_backbones.py::test_xla_convolutions_give_the_cpu_tuned_outputs[resnet18]',  # 12 s
    'test_precision.py::test_features_scores_coreset_search_and_proxies_name_their_precision',
    'test_patchcore.py::test_load_refuses_broken_models_naming_the_file',  # 12 s
    'test_backbones.py::test_vgg16_matches_torch_with_real_weights',  # 12 s
    'test_backbones.py::test_fold_batchnorm_keeps_outputs[resnext50_32x4d]',  # 11 s
    'test_backbones.py::test_bfloat16_backbone_is_mixed_precision_on_both_paths[efficientnet_lite0]',
    'test_backbones.py::test_bfloat16_backbone_is_mixed_precision_on_both_paths[resnet18]',
    'test_gpu_check.py::test_runs_end_to_end_on_the_cpu_when_allowed',  # 35 s
    'test_sweep.py::test_baselines_run_beside_patchcore_on_the_same_backbone',
)


def pytest_collection_modifyitems(items):
  """Marks the tiers (module docstring). The real-data tests run longest: start them first, so
  that with two workers (pytest -n 2) neither is left running them alone at the end."""
  for item in items:
    name = f'{item.path.name}::{item.name}'
    if item.path.name == 'test_real_data.py':
      item.add_marker(pytest.mark.real_data)
      item.add_marker(pytest.mark.slow)
    elif name in SLOW:
      item.add_marker(pytest.mark.slow)
  items.sort(key=lambda item: 0 if item.path.name == 'test_real_data.py' else 1)
