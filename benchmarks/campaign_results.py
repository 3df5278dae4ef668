r"""Gathers the parts of benchmarks/gpu_campaign.sh into one small results.json and prints the goals' verdicts.

  python benchmarks/campaign_results.py --work=OUT/work --out=OUT/results.json [--tiny]

Reads what each part left in --work (any part may be missing: not run, failed or cut short):
  status.tsv         part, status, exit status, seconds, budget (one line per part, written by the script)
  env.json           versions and devices (the 'env' part)
  throughput.json    benchmarks/train_step.py --json_out (ours vs PyTorch, MFU, and our step's profile)
  profile.json       benchmarks/profile_step.py --json_out (the loop's real step, device input)
  e2e_<model>.json   benchmarks/end_to_end.py --json_out, one per model
  accuracy.json      benchmarks/accuracy_run.py --json_out
and checks the issue's goals: top-1 >= 0.93 per net, ours >= 1.2x PyTorch, MFU (VGG-11 >= 50%, AlexNet and NiN
>= 35%), end-to-end >= 0.9x the synthetic step. A goal whose number is missing is 'unknown', never 'met'.
Only Python's standard library: it runs even where a part's imports fail.
"""

import argparse
import glob
import json
import os
import sys

ACCURACY_TARGET = 0.93
THROUGHPUT_RATIO = 1.2
MFU_TARGETS = {'vgg11': 0.50, 'alexnet': 0.35, 'nin': 0.35}
END_TO_END_RATIO = 0.9


def _load(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _status(work):
  parts = {}
  path = os.path.join(work, 'status.tsv')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        fields = line.rstrip('\n').split('\t')
        if len(fields) >= 5:
          parts[fields[0]] = {'status': fields[1], 'exit_status': int(fields[2]) if fields[2].lstrip('-').isdigit()
                              else None, 'seconds': float(fields[3]), 'budget_s': float(fields[4])}
  return parts


def _profile_summary(prof, top=6):
  return {k: prof.get(k) for k in ('wall_ms', 'busy_ms', 'idle_ms', 'by_category', 'by_phase', 'source')} | {
      'top_ops': [{k: r.get(k) for k in ('op', 'ms', 'category', 'phase', 'layer')} for r in prof.get('ops', [])[:top]]}


def gather(work):
  """The results dict (see the module docstring)."""
  out = {'parts': _status(work), 'env': _load(os.path.join(work, 'env.json'))}
  throughput = _load(os.path.join(work, 'throughput.json'))
  out['throughput'], out['step_profile'] = [], {}
  if throughput:
    out['device'] = throughput.get('device')
    for row in throughput.get('rows', []):
      variants = row.get('variants', {})
      ours_label = next((k for k in variants if k.startswith('jax')), None)
      ours = variants.get(ours_label, {})
      torch_info = row.get('torch') or {}
      theirs = variants.get(torch_info.get('label'), {})
      out['throughput'].append({
          'model': row['model'], 'res': row.get('res'), 'batch': row.get('batch'), 'dtype': row.get('dtype'),
          'ours': ours_label, 'ours_img_per_s': ours.get('img_per_s'), 'ours_mfu': ours.get('mfu'),
          'torch': torch_info.get('label'), 'torch_mode': torch_info.get('mode'), 'torch_note': torch_info.get('note'),
          'torch_img_per_s': theirs.get('img_per_s'), 'torch_mfu': theirs.get('mfu'),
          'ours_over_torch': row.get('ours_over_torch'), 'gflop_per_step': (row.get('flops_per_step') or 0) / 1e9})
      for label, prof in (row.get('profile') or {}).items():
        out['step_profile'][row['model']] = dict(_profile_summary(prof), variant=label)
  profile = _load(os.path.join(work, 'profile.json'))
  out['loop_profile'] = {}
  if profile:
    for name, prof in profile.get('models', {}).items():
      out['loop_profile'][name] = dict(_profile_summary(prof), mfu=prof.get('mfu'), img_per_s=prof.get('img_per_s'),
                                       compile_s=prof.get('compile_s'))
  out['end_to_end'] = {}
  for path in sorted(glob.glob(os.path.join(work, 'e2e_*.json'))):
    data = _load(path) or {}
    for row in data.get('rows', []):
      ratio = row['device'] / row['synthetic'] if row.get('device') and row.get('synthetic') else None
      out['end_to_end'][row['model']] = {'synthetic_img_per_s': row.get('synthetic'),
                                         'device_img_per_s': row.get('device'), 'ratio': ratio,
                                         'flags': data.get('flags')}
  accuracy = _load(os.path.join(work, 'accuracy.json'))
  out['accuracy'] = accuracy
  out['goals'] = goals(out)
  return out


def goals(out):
  """[{goal, model, value, target, verdict}] for the issue's four goals."""
  rows = []
  models = [r['model'] for r in out['throughput']] or list(MFU_TARGETS)
  acc = (out.get('accuracy') or {}).get('models', {})
  for model in sorted(set(models) | set(acc)):
    best = (acc.get(model) or {}).get('best_top1')
    rows.append(('top-1', model, best, ACCURACY_TARGET))
  for r in out['throughput']:
    rows.append(('ours/PyTorch', r['model'], r['ours_over_torch'], THROUGHPUT_RATIO))
    if r['model'] in MFU_TARGETS:
      rows.append(('MFU', r['model'], r['ours_mfu'], MFU_TARGETS[r['model']]))
  for model, e in out['end_to_end'].items():
    rows.append(('end-to-end/synthetic', model, e['ratio'], END_TO_END_RATIO))
  return [{'goal': g, 'model': m, 'value': v, 'target': t,
           'verdict': 'unknown' if v is None else ('met' if v >= t else 'not met')} for g, m, v, t in rows]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--work', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--print', action='store_true', help='Print the tables and verdicts.')
  args = parser.parse_args()
  out = gather(args.work)
  out['tiny'] = args.tiny
  with open(args.out + '.tmp', 'w') as f:
    json.dump(out, f, indent=1, default=str)
  os.replace(args.out + '.tmp', args.out)
  if not args.print:
    return 0
  fmt = lambda v, pct=False: '-' if v is None else (f'{100 * v:.1f}%' if pct else f'{v:,.1f}')
  print('throughput (img/s, same batch, same GPU):')
  for r in out['throughput']:
    print(f"  {r['model']:8s} {r['res']}px  ours {fmt(r['ours_img_per_s'])} (MFU {fmt(r['ours_mfu'], True)})  "
          f"{r['torch'] or 'no PyTorch'} {fmt(r['torch_img_per_s'])} (MFU {fmt(r['torch_mfu'], True)})  "
          f"ours/PyTorch {fmt(r['ours_over_torch']) + 'x' if r['ours_over_torch'] else '-'}{'  [' + r['torch_note'] + ']' if r['torch_note'] else ''}")
  for model, e in out['end_to_end'].items():
    print(f"  {model:8s} end-to-end (device input) {fmt(e['device_img_per_s'])} vs synthetic "
          f"{fmt(e['synthetic_img_per_s'])} img/s: {fmt(e['ratio'])}x")
  print('goals' + (' (tiny dry run: the numbers mean nothing)' if args.tiny else '') + ':')
  for g in out['goals']:
    value = '-' if g['value'] is None else f"{g['value']:.3f}"
    print(f"  {g['goal']:22s} {g['model']:8s} {value:>8s}  target >= {g['target']}: {g['verdict']}")
  for name, part in out['parts'].items():
    print(f"  part {name:12s} {part['status']:10s} {part['seconds']:6.0f}s of {part['budget_s']:.0f}s")
  return 0


if __name__ == '__main__':
  sys.exit(main())
