r"""Table 4: larger images, other feature hierarchies, and backbone ensembles.

  python launch.py --config=configs/paper/table4_variants.py:part=resolution \
      --config.data.root=/path/to/mvtec_ad --workdir=workdirs/table4_resolution

One sweep per part (each extracts its features once per variant, PatchCore-1 %, greedy):
  part=resolution   image sizes 224, 280 and 320 (resize 256, 320 and 366: the official
                    `--resize 320 --imagesize 280` and `--resize 366 --imagesize 320`)
  part=hierarchies  feature levels 2+3 (the default) and 1+2+3 (WideResNet-101 in the paper;
                    any backbone here)
  part=ensemble     EfficientNet-Lite2, VGG16 and MobileNetV2 (the ImageNet weights that install
                    here), each alone and as the official ensemble: per backbone, image scores
                    min-max normalised over the test set, then averaged; maps likewise

Arguments: part, category ('+'-joined or 'all'), backbone (resolution, hierarchies),
percentage.
Paper: larger images and ensembles raise MVTec image AUROC; the WideResNet-101 + ResNeXt-101 +
  DenseNet-201 ensemble reaches 99.6 (mean over 15 categories).
Ours on bottle, EfficientNet-Lite2 unless named, PatchCore-1 % (image AUROC / pixel AUROC / AU-PRO,
2-core CPU; docs/paper.md):
  part=resolution   224: 100.00 / 98.51 / 94.95; 280: 100.00 / 98.52 / 95.77; 320: 100.00 / 98.38 /
                    95.65 (1 min 24 s)
  part=hierarchies  2+3: 100.00 / 98.51 / 94.95; 1+2+3: 99.92 / 98.20 / 95.18 (1 min 34 s)
  part=ensemble     VGG16 99.84 / 96.59 / 89.66; MobileNetV2 100.00 / 97.50 / 93.50; the ensemble of
                    the three 100.00 / 98.17 / 94.28 (1 min 43 s)
"""
from configs import common
from configs.paper import sweep_base

PARTS = ('resolution', 'hierarchies', 'ensemble')


def get_config(arg=None):
  args = common.parse_arg(arg, part='resolution', category='bottle', backbone='efficientnet_lite2',
                          percentage=0.01)
  if args['part'] not in PARTS:
    raise ValueError(f'part must be one of {PARTS}, got {args["part"]!r}')
  config = sweep_base(args, percentages=(args['percentage'],), paper='table4')
  if args['part'] == 'resolution':
    config.sweep.image_sizes = (224, 280, 320)
  elif args['part'] == 'hierarchies':
    config.sweep.hierarchies = ('2+3', '1+2+3')
  else:
    config.sweep.backbones = ('efficientnet_lite2', 'vgg16', 'mobilenet_v2')
    config.sweep.ensemble = True
  config.lock()
  return config
