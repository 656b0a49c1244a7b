"""What leaves labelassist: the audit report (report.py) and the exported dataset
(export.py)."""
