package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

// TestQuickstart runs the demo small and short: it must finish with no
// error and the server must never have seen more than the budget.
func TestQuickstart(t *testing.T) {
	var out bytes.Buffer
	res, err := run(context.Background(), options{workspaces: 40, budget: 8, perDB: 2, workers: 12, duration: 3 * time.Second}, &out)
	t.Log("\n" + out.String())
	demo.CheckRun(t, err, out.String())
	if res.errors != 0 {
		t.Fatalf("%d errors, first: %v", res.errors, res.firstError)
	}
	if res.ops == 0 {
		t.Fatal("no queries ran")
	}
	if res.serverPeak > 8 || res.stats.PeakOpen > 8 {
		t.Fatalf("peak %d (driver %d) over the budget of 8", res.serverPeak, res.stats.PeakOpen)
	}
	if !strings.Contains(out.String(), "errors: 0") {
		t.Fatal("summary does not report zero errors")
	}
}
