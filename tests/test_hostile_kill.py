"""kill -9 during a checkpoint save and SIGTERM on a tiny training run (issue 12, Proof): the
rerun resumes from the newest completed checkpoint (no step lost beyond it, no silent restart),
every step's loss equals the uninterrupted run's bit for bit, and SIGTERM exits with status 75.
The full count (12 points of four kinds) is `python -m tests.helpers.kill_resume --points 12
--root DIR` (README, "Safety and errors")."""

from tests.helpers import kill_resume


def test_kill_during_save_and_sigterm_resume_exactly(tmp_path):
  out = kill_resume.main(["--root", str(tmp_path), "--points", "2", "--kinds", "save,sigterm",
                          "--steps", "9"])
  s, results = out["summary"], out["results"]
  assert s["lost_beyond_save"] == 0 and s["silent_restarts"] == 0 and s["rerun_failed"] == 0
  assert s["losses_equal"] == 2, results
  save, term = results
  assert save["during_save"] and save["stop_rc"] == -9 and save["resumed_from"] > 0
  assert term["sigterm_rc_ok"] and term["resumed_from"] == term["newest_completed"] > 0
