r"""PatchCore on MVTec AD.

  python launch.py --config=configs/mvtec.py:category=bottle,backbone=vgg16 \
      --config.data.root=/path/to/mvtec_ad --workdir=workdirs/mvtec_bottle_vgg16

Arguments (after the colon): category (any of the 15, '+'-joined, or 'all': those present), backbone (default
efficientnet_lite2), percentage (coreset fraction, default 0.1).

Expected on bottle (image AUROC / pixel AUROC / AU-PRO, measured on a 2-core CPU, see docs/results.md):
  backbone=vgg16,percentage=0.1               0.9952 / 0.9695 / 0.9044  (official: 0.9960 / 0.9696 / 0.9035)
  backbone=vgg16,percentage=0.01              0.9984 / 0.9659 / 0.8966  (official: 1.0000 / 0.9646 / 0.8951)
  backbone=efficientnet_lite2,percentage=0.1  1.0000 / 0.9867 / 0.9507  (official: 1.0000 / 0.9866 / 0.9498)
  backbone=efficientnet_lite2,percentage=0.01 1.0000 / 0.9851 / 0.9495  (official: 1.0000 / 0.9853 / 0.9486)
Parity with the official code (random-weight WideResNet-50-2, whole bank): add
  backbone=wide_resnet50_2,percentage=1.0 --config.backbone.checkpoint=wrn50_seed0_bnrand.pth
  --config.backbone.official_bn_probe_passes=2   -> 0.9357 / 0.9303 / 0.7575 (official: the same).
Through TFDS (the category built once as mvtec_ad/<category> array_record, then read with
tfds.data_source): add --config.data.source=tfds [--config.data.tfds_data_dir=DIR]
  -> the same metrics and scores (measured: vgg16 at 0.1; building bottle took 0.95 s).
On several devices: --config.devices=N (N | data.batch_size); several processes:
  --config.distributed.coordinator_address=HOST:PORT --config.distributed.num_processes=P
  --config.distributed.process_id=I (docs/scale.md).
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, category='bottle', backbone='efficientnet_lite2', percentage=0.1)
  config = common.get_base_config(args['backbone'])
  config.data.name = 'mvtec'
  # 'all': every category present under data.root (resolved when the run starts).
  config.data.categories = tuple(args['category'].split('+'))
  config.coreset.percentage = args['percentage']
  config.lock()
  return config
