package tenantpg

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestGrowthRule: the growth rule on its own. A pool with no backend dials;
// one at its cap, or with nothing measured, waits; otherwise it dials when
// its queue would wait longer than a dial takes, or when its callers'
// decaying waits already add up to more.
func TestGrowthRule(t *testing.T) {
	var g growth
	now := smEpoch
	require.True(t, g.shouldDial(0, 1, 3, time.Second, now), "no backend")
	require.False(t, g.shouldDial(1, 5, 3, time.Millisecond, now), "nothing measured: the first backend will tell")
	g.used(10 * time.Millisecond)
	require.False(t, g.shouldDial(3, 5, 3, time.Millisecond, now), "at the cap")

	// 2 callers on 1 backend held 10ms: they wait 3·10ms in all.
	require.True(t, g.shouldDial(1, 2, 3, 29*time.Millisecond, now))
	require.False(t, g.shouldDial(1, 2, 3, 31*time.Millisecond, now))
	require.False(t, g.shouldDial(2, 2, 3, 16*time.Millisecond, now), "two backends: half the wait")

	// Sustained waits: the debt pays for a dial, and decays.
	g.owe(20*time.Millisecond, now)
	g.owe(20*time.Millisecond, now)
	require.True(t, g.shouldDial(1, 1, 3, 31*time.Millisecond, now), "40ms owed")
	require.False(t, g.shouldDial(1, 1, 3, 31*time.Millisecond, now.Add(waitDebtDecay)), "decayed to about 15ms")
	g.owe(40*time.Millisecond, now.Add(waitDebtDecay))
	g.paid()
	require.False(t, g.shouldDial(1, 1, 3, 31*time.Millisecond, now.Add(waitDebtDecay)), "paid by a dial")
}
