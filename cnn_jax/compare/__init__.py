"""Comparing architectures under one pipeline: sweeps (sweep.py), verified reports (report.py), plots.

  python sweep.py --sweep=configs/sweeps/families.py --root=runs/families
  python report.py --runs='runs/families/*' --out=reports/families
"""
