package tenantpg

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The circuit on its own, without a budget or a server: its backoff, and
// the state a dial's outcome leaves it in.

// TestProbeBackoffBounds: between half and all of a delay that doubles from
// probeBackoffMin with each failed probe, up to probeBackoffMax.
func TestProbeBackoffBounds(t *testing.T) {
	for failures := range 12 {
		d := min(probeBackoffMin<<failures, probeBackoffMax)
		for range 50 {
			got := probeBackoff(failures)
			require.GreaterOrEqual(t, got, d/2, "after %d failures", failures)
			require.LessOrEqual(t, got, d, "after %d failures", failures)
		}
	}
}

// TestCircuitBackoff: a trip schedules the first probe after about
// probeBackoffMin; a failed probe pushes the next one further, one whose
// caller gave up does not; a reset clears the outage.
func TestCircuitBackoff(t *testing.T) {
	clk := &smClock{now: smEpoch}
	var c circuit
	c.wake.fn = func() {}
	refused, again := errors.New("refused"), errors.New("refused again")

	require.True(t, c.trip(smEpoch, refused), "it was up")
	require.False(t, c.trip(smEpoch, again), "already down")
	require.Equal(t, again, c.lastErr, "the last error is kept")
	require.Equal(t, uint64(1), c.outages)
	first := c.probeAt.Sub(smEpoch)
	require.GreaterOrEqual(t, first, probeBackoffMin/2)
	require.LessOrEqual(t, first, probeBackoffMin)
	require.False(t, c.probeDue(smEpoch), "not before its backoff")
	require.True(t, c.probeDue(c.probeAt))

	c.armProbe(clk, smEpoch)
	require.True(t, c.wake.armed)
	require.Equal(t, c.probeAt, c.wake.at, "armed for the backoff's end")

	now := c.probeAt
	c.probing = true
	require.False(t, c.probeDue(now), "one probe at a time")
	c.probeEnded(now, true)
	require.Equal(t, 1, c.failures)
	second := c.probeAt.Sub(now)
	require.GreaterOrEqual(t, second, probeBackoffMin, "doubled: at least half of 2x the minimum")

	at := c.probeAt
	c.probing = true
	c.probeEnded(now, false) // its caller gave up: no news of the server
	require.Equal(t, 1, c.failures)
	require.Equal(t, at, c.probeAt)

	wasDown, downFor := c.reset(now.Add(time.Second))
	require.True(t, wasDown)
	require.Equal(t, now.Add(time.Second).Sub(smEpoch), downFor)
	require.False(t, c.down)
	require.Zero(t, c.failures)
	require.False(t, c.wake.armed, "no probe while up")
	wasDown, _ = c.reset(now)
	require.False(t, wasDown)
	c.armProbe(clk, now)
	require.False(t, c.wake.armed, "up: nothing to probe")
}
