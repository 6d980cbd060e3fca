package loadtest

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
)

// Scrape reads the Prometheus text exposition at http://addr/metrics and
// returns every sample by its name and labels as printed, for example
// `graceful_upgrades_total{outcome="succeeded"}`.
func Scrape(ctx context.Context, addr string) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	// A connection of its own, closed after: a scrape must not leave an
	// idle connection counted in what it measures.
	resp, err := (&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			return nil, fmt.Errorf("GET /metrics: malformed line %q", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("GET /metrics: line %q: %w", line, err)
		}
		out[line[:i]] = v
	}
	return out, sc.Err()
}

// Resources is what one server process holds.
type Resources struct {
	FDs, Threads, Goroutines int
	RSSKiB                   int64
}

// Measure reads what process pid holds: descriptors, threads and resident
// memory from /proc, goroutines (go_goroutines) from the /metrics that
// addr serves, which must be pid's.
func Measure(ctx context.Context, pid int, addr string) (Resources, error) {
	m, err := Scrape(ctx, addr)
	if err != nil {
		return Resources{}, err
	}
	r := Resources{FDs: OpenFDs(pid), Threads: int(ProcStatus(pid, "Threads")), Goroutines: int(m["go_goroutines"]), RSSKiB: ProcStatus(pid, "VmRSS")}
	if r.FDs < 0 {
		return r, fmt.Errorf("process %d: descriptors unreadable", pid)
	}
	return r, nil
}
