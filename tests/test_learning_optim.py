"""The optimisation helpers: the lr schedule across stages and the non-finite loss guard."""
import pytest
import torch

from errors import GFNetDynnError
from learning_helpers.optim import NonFiniteGuard, StepUndo, any_non_finite, build_scheduler, lr_factor


# lr schedule

def test_lr_factor_starts_at_one_and_ends_at_min_ratio():
    kwargs = {'total_epochs': 10, 'min_ratio': 0.2, 'offset': 0}
    factors = [lr_factor(e, **kwargs) for e in range(11)]
    assert factors[0] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(0.2)
    assert all(later <= earlier for earlier, later in zip(factors, factors[1:]))
    assert lr_factor(15, **kwargs) == pytest.approx(0.2)  # past the end it stays at the floor


def test_lr_factor_with_offset_continues_the_same_curve():
    kwargs = {'total_epochs': 10, 'min_ratio': 0.2}
    for epoch in range(6):
        assert lr_factor(epoch, offset=4, **kwargs) == lr_factor(epoch + 4, offset=0, **kwargs)


def test_scheduler_of_a_later_stage_continues_the_same_lrs():
    def lrs(start_epoch: int, epochs: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = build_scheduler(optimizer, 10, 0.2, start_epoch=start_epoch)
        seen = []
        for _ in range(epochs):
            seen.append(optimizer.param_groups[0]['lr'])
            optimizer.step()
            scheduler.step()
        return seen

    assert lrs(4, 6) == pytest.approx(lrs(0, 10)[4:])


# non-finite guard

def test_non_finite_guard_skips_nan_and_stops_after_max_skips_plus_one_in_a_row():
    guard = NonFiniteGuard(max_skips=2)
    assert guard.allows(torch.tensor(float('nan')), 0, 0) is False
    assert guard.allows(torch.tensor(float('inf')), 0, 1) is False
    with pytest.raises(GFNetDynnError, match='non-finite for 3 batches'):
        guard.allows(torch.tensor(float('nan')), 0, 2)


def test_non_finite_guard_resets_on_a_step_taken():
    guard = NonFiniteGuard(max_skips=2)
    for _ in range(3):
        assert guard.allows(torch.tensor(float('nan')), 0, 0) is False
        assert guard.allows(torch.tensor(float('nan')), 0, 1) is False
        assert guard.allows(torch.tensor(1.5), 0, 2) is True
        assert guard.keeps([torch.ones(2)], 0, 2) is True
    assert guard.in_a_row == 0


def test_a_rolled_back_step_counts_in_a_row_though_the_next_loss_is_finite():
    guard = NonFiniteGuard(max_skips=1)
    assert guard.allows(torch.tensor(1.0), 0, 0) and not guard.keeps([torch.tensor([float('nan')])], 0, 0)
    with pytest.raises(GFNetDynnError, match='non-finite for 2 batches'):
        guard.allows(torch.tensor(1.0), 0, 1) and guard.keeps([torch.tensor([float('inf')])], 0, 1)


def test_step_undo_puts_back_the_weights_and_momentum_of_before_the_step():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.tensor([1.0, 1.0])
    optimizer.step()  # weight [0.9, 1.9], momentum [1, 1]
    weight.grad = torch.tensor([float('nan'), 1.0])
    undo = StepUndo(optimizer)
    undo.save()
    optimizer.step()
    undo.restore()
    assert torch.equal(weight.detach(), torch.tensor([0.9, 1.9]))
    assert torch.equal(optimizer.state[weight]['momentum_buffer'], torch.tensor([1.0, 1.0]))


def test_step_undo_keeps_its_buffers_across_steps_and_puts_back_the_latest_save():
    """One StepUndo serves an epoch: each save overwrites the same buffers (no copy allocated per step), a restore
    puts back the state of the last save, and a parameter that had no optimizer state before the step loses it."""
    weight, gate = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([0.5]))
    optimizer = torch.optim.AdamW([weight, gate], lr=0.1)
    undo = StepUndo(optimizer)
    weight.grad = torch.tensor([1.0, -1.0])
    undo.save()
    optimizer.step()  # the first step: AdamW creates step, exp_avg, exp_avg_sq for weight
    buffer = undo._weights[weight]
    before = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}
    gate.grad = torch.tensor([1.0])  # the second step changes the gate too, which has no state yet
    undo.save()
    assert undo._weights[weight] is buffer  # the same buffer, overwritten
    optimizer.step()
    undo.restore()
    assert torch.equal(weight.detach(), before[0]) and gate.item() == 0.5 and gate not in optimizer.state
    assert all(torch.equal(optimizer.state[weight][k], v) for k, v in before[1].items())


def test_any_non_finite_is_exact_beyond_where_a_norm_overflows():
    huge = torch.full((1000,), 1e30)  # finite, but its L2 norm is inf in float32
    assert not any_non_finite([huge, torch.ones(3)])
    assert any_non_finite([huge, torch.tensor([1.0, float('nan')])])
    assert any_non_finite([torch.tensor([float('-inf')])]) and not any_non_finite([])
