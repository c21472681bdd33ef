package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tenantpg/tenantpg"
)

// The textbook reference string (Silberschatz et al.) with 3 frames: 9
// faults for OPT, 12 for LRU, out of 20 references.
func TestSimulationsTextbook(t *testing.T) {
	seq := []int32{7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1}
	if got, want := simulateBelady(seq, 8, 3), float64(20-9)/20; got != want {
		t.Errorf("Belady: hit rate %v, want %v", got, want)
	}
	if got, want := simulateLRU(seq, 8, 3), float64(20-12)/20; got != want {
		t.Errorf("LRU: hit rate %v, want %v", got, want)
	}
}

// optimalMisses finds the fewest misses any replacement policy can have, by
// trying every eviction: exponential, for tiny inputs only.
func optimalMisses(seq []int32, k int) int {
	memo := map[[2]int]int{}
	var best func(i int, cache uint32) int
	best = func(i int, cache uint32) int {
		if i == len(seq) {
			return 0
		}
		key := [2]int{i, int(cache)}
		if v, ok := memo[key]; ok {
			return v
		}
		bit := uint32(1) << seq[i]
		var v int
		switch {
		case cache&bit != 0:
			v = best(i+1, cache)
		case popcount(cache) < k:
			v = 1 + best(i+1, cache|bit)
		default:
			v = len(seq) + 1
			for c := cache; c != 0; c &= c - 1 {
				victim := c & -c
				v = min(v, 1+best(i+1, cache&^victim|bit))
			}
		}
		memo[key] = v
		return v
	}
	return best(0, 0)
}

func popcount(x uint32) int {
	n := 0
	for ; x != 0; x &= x - 1 {
		n++
	}
	return n
}

// Belady is optimal and never worse than LRU, on random small traces.
func TestBeladyIsOptimal(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for trial := range 300 {
		n := 2 + r.IntN(6)
		k := 1 + r.IntN(n)
		seq := make([]int32, 1+r.IntN(18))
		for i := range seq {
			seq[i] = int32(r.IntN(n))
		}
		misses := func(hitRate float64) int { return len(seq) - int(hitRate*float64(len(seq))+0.5) }
		opt := optimalMisses(seq, k)
		if got := misses(simulateBelady(seq, n, k)); got != opt {
			t.Fatalf("trial %d: %v with k=%d: Belady misses %d, optimum %d", trial, seq, k, got, opt)
		}
		if lru := misses(simulateLRU(seq, n, k)); lru < opt {
			t.Fatalf("trial %d: %v with k=%d: LRU misses %d, fewer than the optimum %d", trial, seq, k, lru, opt)
		}
	}
}

func TestTrace(t *testing.T) {
	a, err := newTrace(distZipf, 50, 4, 1000, 100, 0.25, 7)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := newTrace(distZipf, 50, 4, 1000, 100, 0.25, 7)
	for w := range a.workers {
		if !slices.Equal(a.workers[w], b.workers[w]) {
			t.Fatalf("worker %d: the same seed gave different sequences", w)
		}
	}
	counts := make([]int, 50)
	writes := 0
	for _, seq := range a.workers {
		for _, o := range seq {
			counts[o.ws]++
			if o.key < 1 || o.key > 100 {
				t.Fatalf("key %d outside 1..100", o.key)
			}
			if o.write {
				writes++
			}
		}
	}
	if counts[0] <= counts[49] || counts[0] < a.ops()/10 {
		t.Errorf("Zipf: workspace 0 has %d operations and workspace 49 %d; want a hot head", counts[0], counts[49])
	}
	if writes < a.ops()/5 || writes > a.ops()*3/10 {
		t.Errorf("%d writes of %d operations, want about a quarter", writes, a.ops())
	}

	rr, _ := newTrace(distRoundRobin, 10, 3, 20, 100, 0, 7)
	for i, ws := range rr.global() {
		if int(ws) != i%10 {
			t.Fatalf("round-robin: operation %d is on workspace %d, want %d", i, ws, i%10)
		}
	}
}

func TestClassify(t *testing.T) {
	refused := &pgconn.PgError{Code: "53300", Message: "too many connections for role"}
	cases := []struct {
		err  error
		want int
	}{
		{fmt.Errorf("connect: %w", refused), errTooMany},
		{&tenantpg.ConnectError{Workspace: "w", Err: refused, Attempts: 3}, errTooMany},
		{&tenantpg.BudgetError{Workspace: "w"}, errExhausted},
		// A wait the caller's deadline ended is the budget's, not the deadline's.
		{&tenantpg.BudgetError{Workspace: "w", Err: context.DeadlineExceeded}, errExhausted},
		{&seedLimitError{open: 39, max: 40}, errExhausted},
		{fmt.Errorf("query: %w", context.DeadlineExceeded), errDeadline},
		{errors.New("sql: database is closed"), errOther},
	}
	for _, c := range cases {
		if got := classify(c.err); got != c.want {
			t.Errorf("classify(%v) = %s, want %s", c.err, errKindNames[got], errKindNames[c.want])
		}
	}
}

func TestPercentile(t *testing.T) {
	lat := make([]time.Duration, 1000)
	for i := range lat {
		lat[i] = time.Duration(i+1) * time.Millisecond
	}
	for _, c := range []struct {
		p    float64
		want time.Duration
	}{{50, 500 * time.Millisecond}, {99, 990 * time.Millisecond}, {99.9, 999 * time.Millisecond}} {
		if got := percentile(lat, c.p); got != c.want {
			t.Errorf("p%v = %s, want %s", c.p, got, c.want)
		}
	}
	if percentile(nil, 99) != 0 {
		t.Error("percentile of nothing is not 0")
	}
}

// Without a pgbouncer binary the contender is unavailable and says why,
// instead of failing the run.
func TestPgbouncerNotInstalled(t *testing.T) {
	if _, err := findPgbouncer(filepath.Join(t.TempDir(), "no-pgbouncer")); !errors.Is(err, errNotInstalled) {
		t.Fatalf("findPgbouncer of a missing file: %v", err)
	}
	_, err := openPgbouncer(context.Background(), &env{}, 1)
	if !errors.Is(err, errUnavailable) || !errors.Is(err, errNotInstalled) {
		t.Fatalf("openPgbouncer without a binary: %v", err)
	}
}

// The report copes with rows that have nothing to plot: a contender that
// did not run, one with no successful operation, one with a single
// workspace count beside one with two.
func TestReportEdgeCases(t *testing.T) {
	o := defaultOptions()
	o.dists = []string{distZipf}
	m := &measurement{window: time.Second, lat: []time.Duration{time.Millisecond}, ops: 1, totalOps: 1}
	stuck := &measurement{window: time.Second}
	stuck.errs[errStuck] = 2
	rep := &report{opts: o, results: []result{
		{workspaces: 40, dist: distZipf, contender: "tenantpg", m: m, opsPerSec: 1, p99: time.Millisecond, budget: 40, reuse: 0.5, hitRate: 0.5},
		{workspaces: 400, dist: distZipf, contender: "tenantpg", m: m, opsPerSec: 2, p99: 2 * time.Millisecond, budget: 40},
		{workspaces: 40, dist: distZipf, contender: "pgbouncer", status: "not installed"},
		{workspaces: 40, dist: distZipf, contender: "naive", m: stuck, budget: 40, serverConns: -1},
	}, sims: []simResult{{workspaces: 40, dist: distZipf, policy: "lru", k: 13, ops: 100, hitRate: 0.25}}}
	dir := t.TempDir()
	if err := writePNG(filepath.Join(dir, "r.png"), rep); err != nil {
		t.Fatal(err)
	}
	if err := writeCSV(filepath.Join(dir, "r.csv"), rep); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	writeTable(&out, rep)
	for _, want := range []string{"| 40 | zipf | pgbouncer | not installed |", "| 40 | zipf | naive | 0 | 2 | 0 | 0 | 0 | 2 | 0 |", "n/a"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
}

// TestSimOnly runs the cache models without a server, as for workspace
// counts too large for the disk.
func TestSimOnly(t *testing.T) {
	o := defaultOptions()
	o.simOnly = true
	o.workspaces = []int{50, 500}
	o.traceOps = 20_000
	var out bytes.Buffer
	rep, err := run(context.Background(), o, &out, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.results) != 0 || len(rep.sims) != len(o.workspaces)*len(o.dists)*2*len(simPolicies) { // K = B/3 and B, every policy
		t.Fatalf("%d results, %d simulations", len(rep.results), len(rep.sims))
	}
	if !strings.Contains(out.String(), "| 500 | zipf |") || strings.Contains(out.String(), "ok ops/s") {
		t.Fatalf("unexpected output:\n%s", out.String())
	}
}

// TestFrequencyPoliciesBeatLRUOnZipf: on a skewed trace SLRU keeps the hot
// workspaces LRU loses to the tail, and W-TinyLFU's admission keeps at least
// as many; none beats Belady.
func TestFrequencyPoliciesBeatLRUOnZipf(t *testing.T) {
	o := defaultOptions()
	tr, err := newTrace(distZipf, 400, 32, 200_000/32, o.rows, 0, o.seed)
	if err != nil {
		t.Fatal(err)
	}
	seq := tr.global()
	lru, slru := simulateLRU(seq, 400, 40), simulateSLRU(seq, 400, 40)
	tiny, opt := simulateWTinyLFU(seq, 400, 40), simulateBelady(seq, 400, 40)
	if !(lru < slru && slru <= tiny+0.005 && tiny <= opt) {
		t.Fatalf("LRU %.3f, SLRU %.3f, W-TinyLFU %.3f, Belady %.3f", lru, slru, tiny, opt)
	}
}

// TestSketchHalves: the sketch counts up to 15 and forgets by halving.
func TestSketchHalves(t *testing.T) {
	s := newSketch(16)
	for range 20 {
		s.add(7)
	}
	if got := s.estimate(7); got != 15 {
		t.Fatalf("estimate %d, want the 4-bit cap 15", got)
	}
	for i := range s.sampleN {
		s.add(uint64(1000 + i))
	}
	if got := s.estimate(7); got > 8 {
		t.Fatalf("after a halving the estimate is %d, want at most 8", got)
	}
}

// TestNeighbourTraces: the others are the same workers in noisy and quiet;
// noisy adds as many neighbour workers, all in workspace 0.
func TestNeighbourTraces(t *testing.T) {
	noisy, err := newTrace(distNoisy, 201, 64, 100, 100, 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	quiet, err := newTrace(distQuiet, 201, 64, 100, 100, 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(noisy.workers) != 64 || len(quiet.workers) != 32 {
		t.Fatalf("%d noisy workers, %d quiet", len(noisy.workers), len(quiet.workers))
	}
	for w, seq := range quiet.workers {
		if !slices.Equal(seq, noisy.workers[w]) {
			t.Fatalf("worker %d differs between noisy and quiet", w)
		}
		for _, o := range seq {
			if o.ws == 0 || o.neighbour {
				t.Fatalf("an other's op %+v in the neighbour's workspace", o)
			}
		}
	}
	for _, seq := range noisy.workers[32:] {
		if len(seq) != 1 || !seq[0].neighbour || seq[0].ws != 0 {
			t.Fatalf("neighbour worker %+v", seq)
		}
	}
}

// serialTarget serves one operation at a time, each taking d: a server
// whose capacity is 1/d operations per second.
type serialTarget struct {
	mu sync.Mutex
	d  time.Duration
}

func (s *serialTarget) exec(ctx context.Context, _ op) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	time.Sleep(s.d)
	return ctx.Err()
}

func (s *serialTarget) close() error { return nil }

// TestOpenLoopShowsQueueing: offered twice a serial target's capacity, an
// open loop's latencies grow with the queue (measured from the scheduled
// arrival), where a closed loop would report the service time.
func TestOpenLoopShowsQueueing(t *testing.T) {
	tr, err := newTrace(distZipf, 10, 4, 100, 10, 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	var lv live
	tgt := &serialTarget{d: 2 * time.Millisecond} // 500 ops/s
	m := driveOpen(context.Background(), tgt, tr, 1000, 50*time.Millisecond, 400*time.Millisecond, 5*time.Second, &lv, 1)
	if m.ops < 100 || m.errors() != 0 {
		t.Fatalf("%d ops, %d errors", m.ops, m.errors())
	}
	if p99 := percentile(m.lat, 99); p99 < 100*time.Millisecond {
		t.Fatalf("p99 %s: an overloaded server's queue must show in the latency", p99)
	}
	// Within capacity the latency is about the service time.
	m = driveOpen(context.Background(), tgt, tr, 100, 50*time.Millisecond, 400*time.Millisecond, 5*time.Second, &lv, 1)
	if p50 := percentile(m.lat, 50); p50 > 50*time.Millisecond {
		t.Fatalf("p50 %s at a fifth of capacity", p50)
	}
}

// TestServerSetValidation: a -server-set entry that is not name=value is
// refused before a server starts, naming the flag and the entry.
func TestServerSetValidation(t *testing.T) {
	o := defaultOptions()
	o.serverSet = []string{"shared_buffers=2GB", "huge_pages"}
	err := o.validate()
	if err == nil || !strings.Contains(err.Error(), "-server-set") || !strings.Contains(err.Error(), `"huge_pages"`) {
		t.Fatalf("validate = %v, want an error naming -server-set and the entry", err)
	}
	o.serverSet = []string{"shared_buffers=2GB", "huge_pages=try"}
	if err := o.validate(); err != nil {
		t.Fatalf("validate = %v for name=value entries", err)
	}
}
