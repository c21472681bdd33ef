package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tenantpg/tenantpg"
)

// childFlag, as the first argument, makes the program a replica: the
// parent re-executes itself with it and a JSON childSpec. It is not a
// registered flag, so -help does not list it.
const childFlag = "-fleet-replica"

// envChildDSN carries the routed DSN to the replica: the environment, not
// argv, so that the password never shows in ps.
const envChildDSN = "FLEETBENCH_DSN"

// childSpec is everything a replica needs: its schedule is computed from
// the common start and phase length, so no IPC beyond stdout is needed.
type childSpec struct {
	Replica, Replicas    int
	Start                int64 // Unix nanoseconds, the same for every replica of a mode
	Phase, Duration      time.Duration
	OpTimeout            time.Duration
	Workers, ColdWorkers int
	Workspaces           int // ids label(0)…label(W-1), in Zipf rank order
	Rows                 int
	Seed                 int64
	ZipfS                float64
}

// hot reports whether the replica is the hot one at t.
func (s childSpec) hot(t time.Time) bool {
	return s.phaseAt(t)%s.Replicas == s.Replica
}

func (s childSpec) phaseAt(t time.Time) int {
	return int(t.Sub(time.Unix(0, s.Start)) / s.Phase)
}

// line is one JSON line of a replica's stdout: one per second of the run,
// and a final one that says the replica finished.
type line struct {
	Replica  int              `json:"replica"`
	Sec      int              `json:"sec"` // seconds since the common start
	Hot      bool             `json:"hot"`
	Ops      int64            `json:"ops"`
	Errs     map[string]int64 `json:"errs,omitempty"`
	P50      float64          `json:"p50_ms"`
	P99      float64          `json:"p99_ms"`
	Hist     map[int]int64    `json:"hist,omitempty"` // latency buckets (histBucket), for the parent's percentiles
	FirstErr string           `json:"first_err,omitempty"`

	// The driver's counters so far, in every line: a killed replica's
	// last line still counts.
	Dials    uint64 `json:"dials"`
	Rejected uint64 `json:"rejected"` // dials the server refused with 53300 (the driver retries them)
	// The driver's state at the end of the second: connections held,
	// callers waiting, and its fleet share (0 without a fleet budget).
	Open    int `json:"open"`
	Waiting int `json:"waiting"`
	Share   int `json:"share"`
	// Yielded counts the backends it closed for other replicas so far.
	Yielded uint64 `json:"yielded"`

	Final bool `json:"final,omitempty"`
}

// histBucket maps a latency to a bucket, 20 per decade of microseconds
// (12% wide), and bucketValue back to its middle.
func histBucket(d time.Duration) int {
	us := max(float64(d)/float64(time.Microsecond), 1)
	return int(math.Floor(math.Log10(us) * 20))
}

func bucketValue(b int) time.Duration {
	return time.Duration(math.Pow(10, (float64(b)+0.5)/20) * float64(time.Microsecond))
}

type second struct {
	ops      int64
	errs     map[string]int64
	lat      []time.Duration
	firstErr string
}

// recorder collects outcomes by the second in which they ended.
type recorder struct {
	mu    sync.Mutex
	start time.Time
	secs  map[int]*second
}

func (r *recorder) add(end time.Time, d time.Duration, err error) {
	sec := int(end.Sub(r.start) / time.Second)
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.secs[sec]
	if s == nil {
		s = &second{errs: map[string]int64{}}
		r.secs[sec] = s
	}
	if err != nil {
		s.errs[errKind(err)]++
		if s.firstErr == "" {
			s.firstErr = err.Error()
		}
		return
	}
	s.ops++
	s.lat = append(s.lat, d)
}

// flush writes the lines of every second before upTo.
func (r *recorder) flush(spec childSpec, upTo int, enc *json.Encoder) {
	r.mu.Lock()
	var secs []int
	for k := range r.secs {
		if k < upTo {
			secs = append(secs, k)
		}
	}
	slices.Sort(secs)
	taken := make([]*second, len(secs))
	for i, k := range secs {
		taken[i] = r.secs[k]
		delete(r.secs, k)
	}
	r.mu.Unlock()
	for i, k := range secs {
		s := taken[i]
		st := tenantpg.Default().Stats()
		l := line{Replica: spec.Replica, Sec: k, Ops: s.ops, FirstErr: s.firstErr,
			Hot: spec.hot(r.start.Add(time.Duration(k) * time.Second)), Dials: st.Dials, Rejected: st.DialErrors["rejected"],
			Open: st.Open, Waiting: st.Waiting, Yielded: st.Evictions["fleet"]}
		for _, sv := range st.Servers {
			if sv.Fleet != nil {
				l.Share += sv.Fleet.Share
			}
		}
		if len(s.errs) > 0 {
			l.Errs = s.errs
		}
		if len(s.lat) > 0 {
			slices.Sort(s.lat)
			l.P50 = ms(s.lat[len(s.lat)/2])
			l.P99 = ms(s.lat[min(len(s.lat)-1, len(s.lat)*99/100)])
			l.Hist = map[int]int64{}
			for _, d := range s.lat {
				l.Hist[histBucket(d)]++
			}
		}
		_ = enc.Encode(l)
	}
}

func ms(d time.Duration) float64 { return math.Round(float64(d)/1e4) / 100 }

// errKind names the caller-visible error kinds the report counts.
func errKind(err error) string {
	var pgErr *pgconn.PgError
	switch {
	case errors.Is(err, tenantpg.ErrBudgetExhausted):
		return "exhausted"
	case errors.As(err, &pgErr) && pgErr.Code == "53300":
		return "53300"
	case errors.Is(err, tenantpg.ErrServerDown):
		return "server_down"
	case errors.Is(err, context.DeadlineExceeded):
		return "deadline"
	}
	return "other"
}

// childMain runs one replica: closed-loop workers doing primary-key reads
// on Zipf-chosen workspaces through one routed *sql.DB, all of them while
// the replica is hot, ColdWorkers otherwise. The driver is configured only
// by the TENANTPG_* environment the parent set.
func childMain(arg string, stdout, stderr io.Writer) int {
	var spec childSpec
	if err := json.Unmarshal([]byte(arg), &spec); err != nil {
		fmt.Fprintln(stderr, "bad replica spec:", err)
		return 2
	}
	db, err := tenantpg.OpenDB(os.Getenv(envChildDSN))
	if err != nil {
		fmt.Fprintln(stderr, "open:", err)
		return 1
	}
	defer db.Close()

	start := time.Unix(0, spec.Start)
	end := start.Add(spec.Duration)
	rec := &recorder{start: start, secs: map[int]*second{}}
	enc := json.NewEncoder(stdout)

	var wg sync.WaitGroup
	for j := 0; j < spec.Workers; j++ {
		wg.Add(1)
		go func(j int) {
			defer wg.Done()
			worker(db, spec, j, start, end, rec)
		}(j)
	}
	flushDone := make(chan struct{})
	go func() {
		defer close(flushDone)
		for sec := 1; !start.Add(time.Duration(sec-1) * time.Second).After(end); sec++ {
			time.Sleep(time.Until(start.Add(time.Duration(sec) * time.Second)))
			rec.flush(spec, sec, enc)
		}
	}()
	wg.Wait()
	<-flushDone
	rec.flush(spec, math.MaxInt, enc) // operations that ended after the run (their deadline)
	st := tenantpg.Default().Stats()
	_ = enc.Encode(line{Replica: spec.Replica, Final: true, Dials: st.Dials, Rejected: st.DialErrors["rejected"]})
	return 0
}

// worker is one closed-loop caller. Its random streams depend only on the
// seed, the replica and the worker, so every mode replays the same sequence
// of workspaces and keys.
func worker(db *sql.DB, spec childSpec, j int, start, end time.Time, rec *recorder) {
	r := rand.New(rand.NewSource(spec.Seed*1_000_003 + int64(spec.Replica)*1_000 + int64(j)))
	z := rand.NewZipf(r, spec.ZipfS, 1, uint64(spec.Workspaces-1))
	time.Sleep(time.Until(start))
	var v string
	for {
		now := time.Now()
		if !now.Before(end) {
			return
		}
		if !spec.hot(now) && j >= spec.ColdWorkers {
			// Idle until the next phase, when this replica may be hot.
			next := start.Add(time.Duration(spec.phaseAt(now)+1) * spec.Phase)
			if next.After(end) {
				next = end
			}
			time.Sleep(time.Until(next))
			continue
		}
		ws := label(int(z.Uint64()))
		ctx, cancel := context.WithTimeout(tenantpg.WithWorkspace(context.Background(), ws), spec.OpTimeout)
		t := time.Now()
		err := db.QueryRowContext(ctx, "SELECT v FROM kv WHERE id = $1", 1+r.Intn(spec.Rows)).Scan(&v)
		done := time.Now()
		cancel()
		rec.add(done, done.Sub(t), err)
	}
}
