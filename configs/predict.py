r"""Scores new images with a saved model: scores, OK/defect decisions, overlays and masks.

  python launch.py --config=configs/predict.py --config.model=workdirs/bottle/models/bottle \
      --config.images=/path/to/new_images --workdir=workdirs/predictions

`images`: a folder (recursive), a glob ('/data/*/test/*.png', quoted), a text file with one path
per line, or one image. Outputs (see patchcore_jax/jobs/predict.py): predictions.csv with
path,score,normalized_score,anomalous,error; overlays/, masks/ (original resolution), summary.json.
Exit status 0 when every image was scored, 1 when some could not be read, 143 / 130 when SIGTERM /
SIGINT stopped it (the finished batches are in predictions.csv; `--config.resume=True` with the same
workdir continues it).

Expected: on MVTec bottle's test folder with the model saved by
`configs/mvtec.py:category=bottle,backbone=efficientnet_lite2` the scores equal that run's
scores/bottle.csv bit for bit (same batch size); see docs/deployment.md.
"""
import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.job = 'predict'
  config.model = ''  # A saved model directory (WORKDIR/models/<category> of an experiment run).
  config.images = ''  # Folder (recursive), glob, text file of paths, or one image.
  config.batch_size = 0  # 0: the model's batch size (bit-identical scores to its fit run).
  config.num_workers = 0  # Image-decoding threads (0: what the machine suits, as data.num_workers).
  config.threshold = -1.0  # >= 0: use this image (and pixel) threshold instead of the model's.
  config.checkpoint = ''  # The backbone's weights file, if the one recorded in the model moved.
  config.cache_dir = ''  # Converted backbone weights ('' -> $PATCHCORE_JAX_CACHE or ~/.cache).
  # Continue an interrupted run in the same workdir (same model, images and outputs): images
  # already in its predictions.csv are skipped, the rest appended.
  config.resume = False
  config.output = ml_collections.ConfigDict()
  config.output.overlays = True  # Labelled overlay PNG per image.
  config.output.masks = True  # Binary defect mask PNG per image, at the original resolution.
  config.output.save_maps = False  # Raw maps (.npy, network input size).
  config.output.progress = False  # A progress bar beside the logs.
  config.output.overwrite = False  # Replace a previous run's outputs in the workdir.
  config.lock()
  return config
