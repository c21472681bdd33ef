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
// with the kill, small and short. It asserts what holds with and without
// the library's fleet feature; the lines marked "fleet:" are the checks to
// add once the feature lands.
func TestFleetShort(t *testing.T) {
	o := defaultOptions()
	o.replicas, o.workers, o.coldWorkers = 2, 4, 1
	o.workspaces, o.fleetBudget = 20, 8
	o.phase, o.duration = 2*time.Second, 4*time.Second
	o.lead = 1500 * time.Millisecond // replicas under -race start slower
	o.opTimeout = 5 * time.Second
	o.modes = []string{"static", "fleet"}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out, status bytes.Buffer
	rep, err := run(ctx, o, &out, &status)
	demo.CheckRun(t, err, status.String())
	t.Log("\n" + out.String())
	if t.Failed() || testing.Verbose() {
		t.Log("\n" + status.String())
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
	// fleet: if fleet.peak > o.fleetBudget { t.Errorf(...) } // the server's count, coordination sessions included
	// fleet: if fleet.refused != 0 || fleet.rejected != 0 { t.Errorf(...) } // no 53300 at all: the replicas never over-ask
	// fleet: if fleet.errorCount() != 0 { t.Errorf(...) }
	// fleet: if fleet.coordPeak != o.replicas { t.Errorf(...) } // one coordination session per replica
	// fleet: if fleet.kill.reuseAfter < 0 || fleet.kill.reuseAfter > killTarget { t.Errorf(...) }

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
