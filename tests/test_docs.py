"""The docs' measured tables are generated from the result files under docs/results/."""
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_tables():
  spec = importlib.util.spec_from_file_location('make_tables',
                                                os.path.join(ROOT, 'docs', 'make_tables.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_generated_table_is_up_to_date():
  """A number typed into a generated table by hand (or a result file changed without
  regenerating) fails here: `python docs/make_tables.py` rewrites them."""
  tables = _make_tables()
  seen = set()
  for path in tables.markdown_files():
    with open(path) as f:
      text = f.read()
    new, names = tables.render(text, path)
    seen.update(names)
    assert new == text, f'{path} is out of date: run python docs/make_tables.py'
  assert {'results', 'commands', 'breakdown', 'deployment', 'benchmark', 'backbones',
          'paper', 'diskbank'} <= seen
  assert '| VGG16 | MVTec bottle | 10 % |' in tables.results()


def test_record_keeps_result_files_without_local_paths(tmp_path, monkeypatch):
  tables = _make_tables()
  monkeypatch.setattr(tables, 'RESULTS', str(tmp_path / 'results'))
  data = tmp_path / 'data'
  os.makedirs(data)
  monkeypatch.setenv('DATA', str(data))
  workdir = tmp_path / 'work'
  script = ('import json, os, sys; w = sys.argv[1].split("=", 1)[1]; os.makedirs(w + "/scores");'
            'json.dump({"root": os.environ["DATA"] + "/x", "model_dir": w + "/models"},'
            ' open(w + "/results.json", "w"));'
            'open(w + "/scores/a.csv", "w", newline="").write("path,score\\r\\na,1.5\\r\\n")')
  status = tables.record('tiny', [sys.executable, '-c', script, f'--workdir={workdir}', '$DATA'])
  assert status == 0
  kept = tmp_path / 'results' / 'tiny'
  assert json.load(open(kept / 'results.json')) == {'root': '$DATA/x',
                                                    'model_dir': 'WORKDIR/models'}
  assert open(kept / 'scores' / 'a.csv', 'rb').read() == b'path,score\r\na,1.5\r\n'
  run = json.load(open(kept / 'run.json'))
  assert run['command'].endswith('--workdir=WORKDIR $DATA') and run['exit_status'] == 0
  assert run['wall_seconds'] >= 0 and run['peak_rss_mb'] > 0
