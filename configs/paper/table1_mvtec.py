r"""Tables 1-3: PatchCore-25 / 10 / 1 % on every MVTec AD category present under data.root.

  python launch.py --config=configs/paper/table1_mvtec.py --config.data.root=/path/to/mvtec_ad \
      --workdir=workdirs/table1

One process; per category the features are extracted once and the greedy coreset runs once to
25 % (its prefixes are the 10 and 1 % coresets). report.md: image AUROC, pixel AUROC, AU-PRO and
the F1-optimal threshold's misclassified count (Table 1's last row) per category and percentage,
the mean over categories, and the paper's numbers; plots/<category>_{roc,pr}.png (Fig. S3);
overlays/<category>/ (Fig. 1-style labelled anomaly maps of PatchCore-25 %); scores/<category>.csv.

Arguments: category ('all': every category found under data.root; or '+'-joined names),
backbone.
Paper (WideResNet-50, mean over 15 categories): image AUROC 99.1 / 99.0 / 99.0, pixel AUROC
  98.1 / 98.1 / 98.0, PRO 93.4 / 93.5 / 93.1 (25 / 10 / 1 %); bottle 10 %: 100.0 / 98.6 / 96.1.
Ours, bottle (image AUROC / pixel AUROC / AU-PRO; misclassified), 2-core CPU (docs/paper.md):
  backbone=efficientnet_lite2  25 %: 100.00 / 98.69 / 95.25 (0); 10 %: 100.00 / 98.67 / 95.07
    (0); 1 %: 100.00 / 98.51 / 94.95 (0); 1 min 55 s
  backbone=vgg16               25 %: 99.60 / 96.94 / 90.40 (2); 10 %: 99.52 / 96.95 / 90.44 (2);
    1 %: 99.84 / 96.59 / 89.66 (1); 2 min 11 s
"""
from configs import common
from configs.paper import sweep_base


def get_config(arg=None):
  args = common.parse_arg(arg, category='all', backbone='efficientnet_lite2')
  config = sweep_base(args, percentages=(0.25, 0.1, 0.01), paper='table1')
  config.sweep.overlays = 8
  config.lock()
  return config
