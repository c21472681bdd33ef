package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tenantpg/tenantpg"
	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

// TestScrape runs the example briefly, scrapes /metrics while traffic runs
// and checks that the pool and budget series are there with sane values,
// and that /stats needs the token.
func TestScrape(t *testing.T) {
	const budget = 6
	r := startExample(t, budget, 4*time.Second)
	addr := r.addr

	// Scrape until connections have been made and returned.
	var series map[string][]sample
	deadline := time.Now().Add(3 * time.Second)
	for {
		series = scrape(t, "http://"+addr+"/metrics")
		if len(series["db_client_connection_use_time_seconds_count"]) > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, name := range []string{
		"db_client_connection_count", "db_client_connection_max", "db_client_connection_idle_max",
		"db_client_connection_pending_requests", "db_client_connection_create_time_seconds_count",
		"db_client_connection_wait_time_seconds_count", "db_client_connection_use_time_seconds_count",
		"tenantpg_budget_limit", "tenantpg_budget_connections", "tenantpg_budget_waiters",
		"tenantpg_budget_evictions_total", "tenantpg_budget_dial_errors_total", "tenantpg_budget_exhausted_total",
	} {
		if len(series[name]) == 0 {
			t.Errorf("no %s series in /metrics", name)
		}
	}
	if v := series["tenantpg_budget_limit"]; len(v) > 0 && v[0].value != budget {
		t.Errorf("tenantpg_budget_limit = %v, want %d", v[0].value, budget)
	}
	var total float64
	for _, s := range series["db_client_connection_count"] {
		if !strings.Contains(s.labels, `db_client_connection_pool_name="ws_`) || !strings.Contains(s.labels, `db_system_name="postgresql"`) {
			t.Errorf("unexpected labels %s", s.labels)
		}
		total += s.value
	}
	if total > budget {
		t.Errorf("connections reported across workspaces: %v, over the budget %d", total, budget)
	}
	if strings.Contains(r.out.String(), demo.Password) {
		t.Error("the output contains the password")
	}

	resp, err := http.Get("http://" + addr + "/stats")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("/stats without a token: %d", resp.StatusCode)
	}
	req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/stats", nil)
	req.Header.Set("Authorization", "Bearer t0k")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var s tenantpg.Stats
	err = json.NewDecoder(resp.Body).Decode(&s)
	resp.Body.Close()
	if err != nil || s.Limit != budget {
		t.Errorf("/stats: %v, limit %d", err, s.Limit)
	}

	if err := <-r.errc; err != nil {
		t.Fatalf("%v\n%s", err, r.out.String())
	}
}

type sample struct {
	labels string
	value  float64
}

// scrape reads a Prometheus text exposition into series by metric name.
func scrape(t *testing.T, url string) map[string][]sample {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	out := map[string][]sample{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, rest := line, ""
		if i := strings.IndexAny(line, "{ "); i >= 0 {
			name, rest = line[:i], line[i:]
		}
		labels := ""
		if strings.HasPrefix(rest, "{") {
			end := strings.LastIndex(rest, "}")
			labels, rest = rest[:end+1], rest[end+1:]
		}
		v, err := strconv.ParseFloat(strings.Fields(rest)[0], 64)
		if err != nil {
			continue
		}
		out[name] = append(out[name], sample{labels: labels, value: v})
	}
	return out
}

// exampleRun is the example serving in the background for a test.
type exampleRun struct {
	addr string
	errc chan error
	out  bytes.Buffer
}

// startExample runs the example (30 workspaces, 8 workers, the given
// budget, for d) and returns once it serves; it skips the test when no
// PostgreSQL is available outside CI.
func startExample(t *testing.T, budget int, d time.Duration) *exampleRun {
	t.Helper()
	r := &exampleRun{errc: make(chan error, 1)}
	addrc := make(chan string, 1)
	go func() {
		r.errc <- run(context.Background(), options{addr: "127.0.0.1:0", token: "t0k", workspaces: 30, budget: budget, workers: 8,
			duration: d}, &r.out, func(addr string) { addrc <- addr })
	}()
	select {
	case r.addr = <-addrc:
	case err := <-r.errc:
		demo.SkipIfNoServer(t, err)
		t.Fatalf("example ended before serving: %v\n%s", err, r.out.String())
	}
	return r
}
