package tenantpg

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The dial pacing on its own, without a budget or a server: its AIMD on
// the measured dial times.

// TestPacerAIMD: a slot's worth of dials near the baseline adds a slot, up
// to the limit; a dial over twice the baseline halves the slots, not below
// minDialSlots, once per round (a dial granted before the cut does not cut
// again).
func TestPacerAIMD(t *testing.T) {
	p := pacer{slots: initialDialSlots}
	now := smEpoch
	dial := func(epoch uint64, took time.Duration) {
		now = now.Add(time.Millisecond)
		p.dialed(epoch, took, 10, now)
	}
	dial(p.epoch, 10*time.Millisecond) // the baseline
	for range 3 {
		dial(p.epoch, 14*time.Millisecond) // within 1.5x
	}
	require.Equal(t, initialDialSlots+1, p.slots, "a slot's worth of good dials adds one")
	for range 5 {
		dial(p.epoch, 12*time.Millisecond)
	}
	require.Equal(t, initialDialSlots+2, p.slots)
	dial(p.epoch, 17*time.Millisecond) // between 1.5x and 2x: neither
	require.Equal(t, initialDialSlots+2, p.slots)
	require.Zero(t, p.good)

	old := p.epoch
	dial(old, 25*time.Millisecond) // over 2x: halved, not below the floor
	require.Equal(t, max(minDialSlots, (initialDialSlots+2)/2), p.slots)
	require.Equal(t, old+1, p.epoch)
	dial(old, 40*time.Millisecond) // granted before the cut: says nothing of the new count
	require.Equal(t, max(minDialSlots, (initialDialSlots+2)/2), p.slots)
	require.Equal(t, old+1, p.epoch)

	// Growth stops at the limit.
	for range 100 {
		dial(p.epoch, 10*time.Millisecond)
	}
	require.Equal(t, 10, p.slots)
}

// TestPacerBaselineForgets: the baseline is the fastest dial of the last
// one to two paceWindows, so that a fast dial from a quiet moment long ago
// does not make every dial under load look slow.
func TestPacerBaselineForgets(t *testing.T) {
	p := pacer{slots: 8}
	p.dialed(p.epoch, time.Millisecond, 16, smEpoch) // quiet: fast
	p.dialed(p.epoch, 3*time.Millisecond, 16, smEpoch.Add(time.Second))
	require.Equal(t, 4, p.slots, "within two windows of the fast dial: 3x its time cuts")
	p.dialed(p.epoch, 3*time.Millisecond, 16, smEpoch.Add(3*time.Second))
	p.dialed(p.epoch, 5*time.Millisecond, 16, smEpoch.Add(3*time.Second+time.Millisecond))
	require.Equal(t, 4, p.slots, "the fast dial forgotten: 5ms is within 2x of the new baseline")
	require.Equal(t, 3*time.Millisecond, p.winMin)
}
