"""Training hooks that talk to Prefect, with Prefect's client calls recorded (the real server is in the e2e)."""

from __future__ import annotations


def test_progress_artifact_follows_every_tenth_step_and_the_last(monkeypatch):
    """The token-budget bar: updated every 10 steps and at the last step (steps count from 0)."""
    import uuid
    from types import SimpleNamespace

    import prefect.artifacts

    from flows.events import PrefectProgress
    from rwkv5.train.callbacks import StepInfo

    sent = []
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact",
                        lambda artifact_id, progress: sent.append(round(progress, 2)))
    hook = PrefectProgress(artifact_id=str(uuid.uuid4()), every_steps=10)
    hook.ctx = SimpleNamespace(rank=0, config=SimpleNamespace(total_steps=25, token_budget=25 * 100))
    for step in range(25):
        hook.post_step(StepInfo(step=step, loss=1.0, lr=1e-3, grad_norm=None, tokens_seen=(step + 1) * 100,
                                step_time_s=0.1, data_wait_s=0.0, applied=True), {})
    assert sent == [40.0, 80.0, 100.0]


def test_progress_events_carry_a_readable_line(monkeypatch):
    """What `prefect deployment run pretrain/tiny --watch` prints while pretraining: one line per 10 steps."""
    import uuid
    from types import SimpleNamespace

    import prefect.artifacts
    import prefect.events

    from flows.events import PROGRESS_EVENT, PrefectProgress
    from rwkv5.train.callbacks import StepInfo

    events = []
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", lambda artifact_id, progress: None)
    monkeypatch.setattr(prefect.events, "emit_event", lambda event, resource: events.append((event, resource)))
    hook = PrefectProgress(artifact_id=str(uuid.uuid4()), every_steps=10, run_name="tiny-demo")
    hook.ctx = SimpleNamespace(rank=0, config=SimpleNamespace(total_steps=20, token_budget=20 * 100))
    for step in range(20):
        hook.post_step(StepInfo(step=step, loss=6.8123, lr=1e-3, grad_norm=None, tokens_seen=(step + 1) * 100,
                                step_time_s=1.523, data_wait_s=0.0, applied=True), {})
    assert [e for e, _ in events] == [PROGRESS_EVENT] * 2
    assert events[0][1] == {"prefect.resource.id": "rwkv5.run.tiny-demo", "prefect.resource.name":
                            "tiny-demo: step 10/20, 50% of the token budget, loss 6.812, 1.52 s/step"}
