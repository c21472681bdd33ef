package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

// TestTorture runs the soak small and short with every fault in the
// rotation: each must be injected at least once, and the run must end with
// no leak, no unexpected error, the server never above the budget and the
// password nowhere.
func TestTorture(t *testing.T) {
	o := defaultOptions()
	// One full rotation, bounded by the duration on a slow machine.
	o.duration = 40 * time.Second
	o.rotations = 1
	o.workspaces = 60
	o.workers = 16
	o.budget = 8
	o.faultEvery = time.Second
	o.recovery = 500 * time.Millisecond
	o.storm = 300
	var out, status bytes.Buffer
	rep, err := run(context.Background(), o, &out, &status, false)
	demo.CheckRun(t, err, status.String()+out.String())
	t.Log("\n" + out.String())
	if t.Failed() || testing.Verbose() {
		t.Log("\n" + status.String())
	}
	if fails := rep.failures(); len(fails) > 0 {
		t.Errorf("the run failed: %s\nstatus:\n%s", strings.Join(fails, "; "), status.String())
	}
	for _, f := range o.faults {
		if rep.perFault[f].injected == 0 {
			t.Errorf("fault %s was never injected", faultNames[f])
		}
	}
	// What the failures cover, asserted on their own so that a change to
	// failures cannot quietly drop one.
	if rep.unexpected != 0 || !rep.quiet.ok || !rep.after.ok || rep.goroutines != 0 {
		t.Errorf("unexpected %d, quiescent %v, closed %v, goroutines left %d", rep.unexpected, rep.quiet.ok, rep.after.ok, rep.goroutines)
	}
	if rep.serverPeak > o.budget || rep.serverSamples == 0 {
		t.Errorf("server peak %d over %d samples, budget %d", rep.serverPeak, rep.serverSamples, o.budget)
	}
	if len(rep.secretWhere) > 0 || strings.Contains(out.String(), password) || strings.Contains(status.String(), password) {
		t.Errorf("the password appeared in %v or the output", rep.secretWhere)
	}
	if rep.killed == 0 || rep.stormCallers == 0 || rep.closedDBs == 0 || rep.shrinks == 0 || rep.hungAccepted == 0 {
		t.Errorf("a fault did nothing: killed %d, storm callers %d, closed DBs %d, shrinks %d, hung dials %d",
			rep.killed, rep.stormCallers, rep.closedDBs, rep.shrinks, rep.hungAccepted)
	}
}

func TestParseFaults(t *testing.T) {
	fs, err := parseFaults("kill, restart,all")
	if err != nil || len(fs) != 2+len(allFaults()) || fs[1] != faultRestart {
		t.Fatalf("got %v, %v", fs, err)
	}
	if _, err := parseFaults("kill,nope"); err == nil {
		t.Fatal("an unknown fault must be an error")
	}
}

func TestClassifyAndAttribute(t *testing.T) {
	l := newPhaseLog()
	a := l.now()
	l.enter(phase{fault: faultKill})
	l.enter(phase{fault: faultKill, recovering: true})
	l.enter(phase{fault: faultQuiet})
	b := l.now()
	if got := l.attribute(a, b); got != faultKill {
		t.Fatalf("an operation spanning a whole fault is blamed on %s", faultNames[got])
	}
	if got := l.attribute(b, b); got != faultQuiet {
		t.Fatalf("an operation in a quiet phase is blamed on %s", faultNames[got])
	}
	if k := classify(context.DeadlineExceeded, classServer); k != errContext {
		t.Fatalf("deadline classified as %s", kindNames[k])
	}
	if k := classify(context.DeadlineExceeded, classHung); k != errHung {
		t.Fatalf("hung workspace classified as %s", kindNames[k])
	}
}
