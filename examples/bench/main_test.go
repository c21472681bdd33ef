package main

import (
	"bytes"
	"context"
	"encoding/csv"
	"image/png"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

// TestBenchShort runs the whole harness small and short: 30 workspaces, a
// budget of 8, 8 workers, both distributions, every contender (PgBouncer
// when it is installed), under a second each. It checks what the benchmark
// exists to show and what would make its output wrong: tenantpg stays
// within the budget with no errors, the cache models are consistent, the
// table, CSV and PNG are written and parse, and the password appears
// nowhere.
func TestBenchShort(t *testing.T) {
	const budget = 8
	dir := t.TempDir()
	o := defaultOptions()
	o.workspaces = []int{30}
	o.budget = budget
	o.workers = 8
	o.duration = 800 * time.Millisecond
	o.warmup = 200 * time.Millisecond
	// PgBouncer's stuck clients are released by the operation deadline;
	// a short one keeps the test short.
	o.opTimeout = 2 * time.Second
	o.acquireTimeout = 1500 * time.Millisecond
	o.traceOps = 50_000
	o.csvPath = filepath.Join(dir, "bench.csv")
	o.pngPath = filepath.Join(dir, "bench.png")
	o.occupancyPNG = filepath.Join(dir, "occupancy.png")
	o.contenders = append(defaultContenders(), "dial-each")

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	rep, err := run(ctx, o, &stdout, &stderr)
	t.Log("\n" + stdout.String())
	demo.CheckRun(t, err, stderr.String())

	_, pgbErr := findPgbouncer("")
	if got, want := len(rep.results), 2*len(o.contenders); got != want {
		t.Fatalf("%d results, want %d", got, want)
	}
	for _, r := range rep.results {
		if r.contender == "pgbouncer" && pgbErr != nil {
			if r.status != "not installed" {
				t.Errorf("%s %s: pgbouncer is not installed but the row says %q", r.dist, r.contender, r.status)
			}
			continue
		}
		if r.status != "" {
			t.Errorf("%s %s did not run: %s", r.dist, r.contender, r.status)
			continue
		}
		if r.peak > budget {
			t.Errorf("%s %s: the server saw %d app-role backends, more than its limit of %d", r.dist, r.contender, r.peak, budget)
		}
		switch r.contender {
		case "tenantpg":
			if n := r.m.errors(); n != 0 {
				t.Errorf("%s tenantpg: %d errors (%s), first: %v", r.dist, n, errBreakdown(r.m), r.m.firstErr)
			}
			if r.m.ops == 0 || r.dials <= 0 || r.hitRate < 0 || r.hitRate > 1 {
				t.Errorf("%s tenantpg: ops %d, dials %d, hit rate %v", r.dist, r.m.ops, r.dials, r.hitRate)
			}
			// The server's count of sessions and the driver's of dials
			// describe the same connections (a dial the server refused is
			// no session).
			if r.serverConns >= 0 && (r.serverConns > r.dials || r.serverConns < r.dials/2) {
				t.Errorf("%s tenantpg: the server counted %d sessions for %d dials", r.dist, r.serverConns, r.dials)
			}
		case "dial-each":
			// Its point is a session per operation: the server must have
			// counted at least one for every operation that succeeded.
			if r.m.ops == 0 || r.serverConns >= 0 && r.serverConns < r.m.ops {
				t.Errorf("%s dial-each: %d operations on %d sessions", r.dist, r.m.ops, r.serverConns)
			}
		case "single-db":
			if r.m.ops == 0 || r.m.errors() != 0 {
				t.Errorf("%s single-db: ops %d, errors %d (%s)", r.dist, r.m.ops, r.m.errors(), errBreakdown(r.m))
			}
		}
	}

	// The cache models: the optimum is never below LRU, and a bigger cache
	// never hits less.
	hit := map[string]float64{}
	for _, s := range rep.sims {
		hit[s.dist+"/"+s.policy+"/"+strconv.Itoa(s.k)] = s.hitRate
		if s.hitRate < 0 || s.hitRate > 1 {
			t.Errorf("sim %+v: hit rate out of range", s)
		}
	}
	if want := 2 * 2 * len(simPolicies); len(rep.sims) != want { // two traces, K = B/3 and B
		t.Fatalf("%d cache simulations, want %d", len(rep.sims), want)
	}
	for _, d := range []string{distZipf, distRoundRobin} {
		for _, k := range []int{budget / 3, budget} {
			opt := hit[d+"/belady/"+strconv.Itoa(k)]
			for _, p := range simPolicies {
				if h := hit[d+"/"+p.name+"/"+strconv.Itoa(k)]; opt < h {
					t.Errorf("%s K=%d: Belady %.3f below %s %.3f", d, k, opt, p.name, h)
				}
			}
		}
		if hit[d+"/belady/"+strconv.Itoa(budget)] < hit[d+"/belady/"+strconv.Itoa(budget/3)] {
			t.Errorf("%s: Belady hits less with a bigger cache", d)
		}
	}
	if hit["rr/lru/8"] != 0 {
		t.Errorf("round-robin over 30 workspaces with 8 LRU slots must always miss, got %.3f", hit["rr/lru/8"])
	}

	// Every database had its first session before any contender ran.
	if !strings.Contains(stdout.String(), "A first session to each of them") {
		t.Error("the report does not say the databases were warmed")
	}

	// The markdown table: one row per contender and distribution, and one
	// per distribution in the cache table.
	out := stdout.String()
	if !strings.Contains(out, "| W | dist | contender | ok ops/s |") {
		t.Fatalf("no comparison table in the output:\n%s", out)
	}
	rows := 0
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "| 30 | ") {
			rows++
			if strings.Count(line, "|") < 9 {
				t.Errorf("short table row: %s", line)
			}
		}
	}
	if want := 2*len(o.contenders) + 2; rows != want {
		t.Errorf("%d table rows for W=30, want %d", rows, want)
	}

	raw, err := os.ReadFile(o.csvPath)
	if err != nil {
		t.Fatal(err)
	}
	records, err := csv.NewReader(bytes.NewReader(raw)).ReadAll()
	if err != nil {
		t.Fatalf("the CSV does not parse: %v", err)
	}
	if !slices.Equal(records[0], csvHeader) {
		t.Fatalf("CSV header %v", records[0])
	}
	if got, want := len(records)-1, 2*len(o.contenders)+len(rep.sims); got != want {
		t.Fatalf("%d CSV rows, want %d", got, want)
	}
	col := func(name string) int { return slices.Index(csvHeader, name) }
	for _, rec := range records[1:] {
		if rec[col("kind")] == "run" && rec[col("contender")] == "tenantpg" {
			if rec[col("errors")] != "0" {
				t.Errorf("CSV: tenantpg row with errors %s", rec[col("errors")])
			}
			if v, err := strconv.ParseFloat(rec[col("ops_per_s")], 64); err != nil || v <= 0 {
				t.Errorf("CSV: tenantpg ops_per_s %q", rec[col("ops_per_s")])
			}
		}
	}

	for _, path := range []string{o.pngPath, o.occupancyPNG} {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		img, err := png.Decode(f)
		f.Close()
		if err != nil {
			t.Fatalf("%s does not decode: %v", path, err)
		}
		if b := img.Bounds(); b.Dx() < 600 || b.Dy() < 400 {
			t.Errorf("%s is only %dx%d", path, b.Dx(), b.Dy())
		}
	}
	for _, r := range rep.results {
		if r.contender == "tenantpg" && len(r.occupancy) == 0 {
			t.Errorf("W=%d %s: no occupancy samples for tenantpg", r.workspaces, r.dist)
		}
	}

	for name, text := range map[string]string{"stdout": out, "stderr": stderr.String(), "CSV": string(raw)} {
		if strings.Contains(text, password) {
			t.Errorf("the password appears in the %s", name)
		}
	}
}
