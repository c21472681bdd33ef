package main

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

// TestMain lets the test binary be a replica too: the harness re-executes
// os.Executable(), which under go test is this binary.
func TestMain(m *testing.M) {
	if len(os.Args) > 2 && os.Args[1] == childFlag {
		os.Exit(childMain(os.Args[2], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// TestFleetShort runs two replica processes through static and fleet mode,
// with the kill, small and short: the CI version of the fleet measurement.
func TestFleetShort(t *testing.T) {
	o := defaultOptions()
	o.replicas, o.workers, o.coldWorkers = 2, 4, 1
	o.workspaces, o.fleetBudget = 20, 8
	o.phase, o.duration = 2*time.Second, 4*time.Second
	o.lead = 1500 * time.Millisecond // replicas under -race start slower
	o.opTimeout = 5 * time.Second
	o.modes = []string{"static", "fleet", "single", "partitioned"}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out, status bytes.Buffer
	rep, err := run(ctx, o, &out, &status)
	demo.CheckRun(t, err, status.String())
	t.Log("\n" + out.String())
	if t.Failed() || testing.Verbose() {
		t.Log("\n" + status.String())
	}

	// The first mode must not pay for every database's first session.
	if !strings.Contains(status.String(), "each warmed by a first session") {
		t.Error("the workspace databases were not warmed before the modes")
	}
	if p := rep.problems(); len(p) > 0 {
		t.Errorf("the run itself failed: %s", strings.Join(p, "; "))
	}
	for _, m := range rep.modes {
		if m.ops == 0 || m.lines == 0 || m.samples == 0 {
			t.Errorf("%s: ops %d, per-second lines %d, server samples %d", m.mode, m.ops, m.lines, m.samples)
		}
		for i, n := range m.opsByReplica {
			if n == 0 {
				t.Errorf("%s: replica-%d reported no reads", m.mode, i)
			}
		}
		if !strings.Contains(out.String(), "| "+m.mode+" | ") {
			t.Errorf("no table row for %s", m.mode)
		}
	}

	static := rep.mode("static")
	if static.peak > o.fleetBudget || static.peak == 0 {
		t.Errorf("static: server peak %d, budget %d", static.peak, o.fleetBudget)
	}
	// F/N each never asks the server for more than F.
	if static.errorCount() != 0 || static.refused != 0 || static.rejected != 0 {
		t.Errorf("static: caller errors %s, %d refusals in the log, %d refused dials; first error: %s",
			static.errorText(), static.refused, static.rejected, static.firstErr)
	}

	fleet := rep.mode("fleet")
	if k := fleet.kill; k == nil || k.skipped != "" || k.held == 0 || k.goneAfter < 0 {
		t.Errorf("fleet: the kill did not happen or its sessions never left the server: %+v", k)
	}
	// The fleet's cap holds on the server's own count, coordination
	// sessions included, and nobody ever asks it for more.
	if fleet.peak > o.fleetBudget {
		t.Errorf("fleet: server peak %d over the fleet budget %d", fleet.peak, o.fleetBudget)
	}
	if fleet.refused != 0 || fleet.rejected != 0 || fleet.errorCount() != 0 {
		t.Errorf("fleet: %d refusals in the log, %d refused dials, caller errors %s; first error: %s",
			fleet.refused, fleet.rejected, fleet.errorText(), fleet.firstErr)
	}
	if fleet.coordPeak != o.replicas {
		t.Errorf("fleet: %d coordination sessions at most, want one per replica (%d)", fleet.coordPeak, o.replicas)
	}
	// How soon the killed replica's slots served the others is measured
	// (BENCHMARKS.md), not asserted: a time bound would fail on a loaded
	// machine without anything being wrong.
	if k := fleet.kill; k != nil {
		t.Logf("fleet: the killed replica's slots served the others after %v", k.reuseAfter)
	}

	// Mode single is one process running every replica's workers on the
	// whole budget, with no coordination session.
	single := rep.mode("single")
	if single.peak > o.fleetBudget || single.coordPeak != 0 || single.errorCount() != 0 {
		t.Errorf("single: server peak %d (budget %d), %d coordination sessions, caller errors %s",
			single.peak, o.fleetBudget, single.coordPeak, single.errorText())
	}
	// Mode partitioned is single with each replica's workers on their own
	// *sql.DB, so their own pools.
	part := rep.mode("partitioned")
	if part.peak > o.fleetBudget || part.coordPeak != 0 || part.errorCount() != 0 || part.dbs != o.replicas || single.dbs != 1 {
		t.Errorf("partitioned: server peak %d (budget %d), %d coordination sessions, caller errors %s, %d *sql.DB (single %d)",
			part.peak, o.fleetBudget, part.coordPeak, part.errorText(), part.dbs, single.dbs)
	}
	if !strings.Contains(out.String(), "- fleet/single ") {
		t.Error("no fleet/single ratio in the summary")
	}
	if fleet.kill == nil || !strings.Contains(out.String(), "Share moves (fleet;") {
		t.Error("no share moves reported for fleet mode")
	}

	for name, text := range map[string]string{"output": out.String(), "status": status.String()} {
		if strings.Contains(text, password) {
			t.Errorf("the password appears in the %s", name)
		}
	}
}

func TestPercentileAndBuckets(t *testing.T) {
	h := map[int]int64{}
	for i := 1; i <= 100; i++ {
		h[histBucket(time.Duration(i)*time.Millisecond)]++
	}
	// Buckets are 12% wide: the estimate is within that of the truth.
	for q, want := range map[float64]float64{0.5: 50, 0.99: 99} {
		if got := percentile(h, q); got < want*0.88 || got > want*1.12 {
			t.Errorf("p%.0f = %.2f ms, want about %.0f", q*100, got, want)
		}
	}
	if percentile(map[int]int64{}, 0.5) != 0 {
		t.Error("an empty histogram has no percentile")
	}
}
