// Command zdbench measures zero downtime: it drives three servers with the
// same endpoints through the same deploys under the same mixed load
// (keep-alive GET and POST, fresh connections, slow requests in flight, SSE
// and WebSocket streams) and prints what the clients saw:
//
//   - graceful: the reference server (examples/httpserver), upgraded by SIGHUP;
//   - tableflip: plain cloudflare/tableflip as its documentation shows,
//     upgraded by SIGHUP;
//   - nethttp: net/http with Shutdown on SIGTERM, deployed by stopping it
//     and starting the new binary, which is what most servers do.
//
// Usage (from the repository root; the default run takes about 40 s):
//
//	go run ./cmd/zdbench [-upgrades 5] [-settle 1s] [-servers graceful,tableflip,nethttp] [-svg zdbench.svg]
//
// -svg draws the run: requests per second answered by each serving process
// and failures over time, one panel per server, deploys marked.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/graceful-go/graceful/internal/loadtest"
)

var packages = map[string]string{
	"graceful":  "github.com/graceful-go/graceful/examples/httpserver",
	"tableflip": "github.com/graceful-go/graceful/internal/zdbench/tableflipserver",
	"nethttp":   "github.com/graceful-go/graceful/internal/zdbench/nethttpserver",
}

// options are the command line.
type options struct {
	upgrades int
	settle   time.Duration
	servers  []string
	svg      string // write the picture here
}

// result is what the clients saw of one server.
type result struct {
	name            string
	stats           *loadtest.Stats
	upgrades        []time.Time     // when each deploy was signalled
	ready, oldExit  []time.Duration // signal to new-ready, signal to old-exit
	peakRSS         int64           // kB, the largest of the old processes
	steady, nearUpg []time.Duration // latencies away from and within 1 s of a deploy
	start, end      time.Time       // of the load
}

func main() {
	var o options
	var servers string
	flag.IntVar(&o.upgrades, "upgrades", 5, "deploys per server")
	flag.DurationVar(&o.settle, "settle", time.Second, "load between deploys")
	flag.StringVar(&servers, "servers", "graceful,tableflip,nethttp", "servers to compare")
	flag.StringVar(&o.svg, "svg", "", "also draw the run as an SVG picture in this file")
	flag.Parse()
	o.servers = strings.Split(servers, ",")
	results, err := run(context.Background(), o, os.Stderr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "zdbench:", err)
		os.Exit(1)
	}
	report(os.Stdout, o, results)
	if o.svg != "" {
		if err := saveSVG(o, results); err != nil {
			fmt.Fprintln(os.Stderr, "zdbench:", err)
			os.Exit(1)
		}
	}
}

// saveSVG writes the picture to o.svg.
func saveSVG(o options, results []*result) error {
	f, err := os.Create(o.svg)
	if err != nil {
		return err
	}
	if err := writeSVG(f, o, results); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func run(ctx context.Context, o options, progress io.Writer) ([]*result, error) {
	if o.upgrades < 1 || o.settle <= 0 {
		return nil, errors.New("-upgrades must be at least 1 and -settle positive")
	}
	dir, err := os.MkdirTemp("", "zdbench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	var results []*result
	for _, name := range o.servers {
		pkg, ok := packages[name]
		if !ok {
			return nil, fmt.Errorf("unknown server %q (want graceful, tableflip or nethttp)", name)
		}
		fmt.Fprintf(progress, "%s: building and running %d deploys ...\n", name, o.upgrades)
		r, err := measure(ctx, o, name, pkg, filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		results = append(results, r)
	}
	return results, nil
}

func measure(ctx context.Context, o options, name, pkg, dir string) (*result, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	bin, err := loadtest.Build(ctx, dir, pkg, false)
	if err != nil {
		return nil, err
	}
	logs, err := os.Create(filepath.Join(dir, "server.log"))
	if err != nil {
		return nil, err
	}
	defer logs.Close()
	cfg := loadtest.Config{Bin: bin, Dir: dir, Logs: logs}
	srv, err := loadtest.Start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	servers := []*loadtest.Server{srv}
	defer func() {
		for _, s := range servers {
			s.Kill()
		}
	}()
	cfg.Addr = srv.Addr

	load := loadtest.StartLoad(srv.Addr, loadtest.Mix{
		KeepAliveGET: 3, KeepAlivePOST: 3, FreshGET: 2, Slow: 2, SSE: 2, WS: 2, Pause: 5 * time.Millisecond,
	})
	r := &result{name: name, start: time.Now()}
	time.Sleep(o.settle)
	for range o.upgrades {
		old := srv.PID()
		peakRSS := loadtest.WatchPeakRSS(old)
		start := time.Now()
		r.upgrades = append(r.upgrades, start)
		var ready, exit time.Duration
		if name == "nethttp" {
			// Stop, then start the new binary: the only deploy it has.
			err := srv.Signal(syscall.SIGTERM)
			if err == nil {
				_, err = srv.WaitExit(ctx, old)
			}
			if err != nil {
				load.Stop()
				return nil, fmt.Errorf("stopping pid %d: %w", old, err)
			}
			exit = time.Since(start)
			srv, err = loadtest.Start(ctx, cfg)
			if err != nil {
				load.Stop()
				return nil, err
			}
			servers = append(servers, srv)
			ready = time.Since(start)
		} else {
			u, err := srv.Upgrade(ctx, time.Minute)
			if err != nil {
				load.Stop()
				return nil, err
			}
			ready, exit = u.Ready, u.OldExit
		}
		r.ready, r.oldExit = append(r.ready, ready), append(r.oldExit, exit)
		r.peakRSS = max(r.peakRSS, peakRSS())
		time.Sleep(o.settle)
	}
	r.stats = load.Stop()
	r.end = time.Now()
	srv.Stop(ctx, 40*time.Second)
	for _, l := range r.stats.Latencies {
		near := false
		for _, u := range r.upgrades {
			if d := l.At.Sub(u); d > -time.Second && d < time.Second {
				near = true
				break
			}
		}
		if near {
			r.nearUpg = append(r.nearUpg, l.D)
		} else {
			r.steady = append(r.steady, l.D)
		}
	}
	return r, nil
}

func report(w io.Writer, o options, results []*result) {
	fmt.Fprintf(w, "\n%d deploys per server under mixed load, %v between deploys\n\n", o.upgrades, o.settle)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "server\trequests\tfailed\tfailures by class\tp50/p99/max steady\tp50/p99/max ±1s of deploy\tsignal→new ready\tsignal→old exit\tstreams graceful/abrupt\told peak RSS")
	for _, r := range results {
		s := r.stats
		failed := 0
		var classes []string
		for k, v := range s.Failures {
			failed += v
			classes = append(classes, fmt.Sprintf("%s=%d", k, v))
		}
		sort.Strings(classes)
		if len(classes) == 0 {
			classes = []string{"-"}
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%d/%d\t%.1f MiB\n",
			r.name, s.Requests, failed+s.StreamFailures, strings.Join(classes, " "),
			percentiles(r.steady), percentiles(r.nearUpg), meanMax(r.ready), meanMax(r.oldExit),
			s.StreamsGraceful, s.StreamsAbrupt+s.StreamFailures, float64(r.peakRSS)/1024)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nfailed counts requests that failed and streams that could not be opened; an abrupt stream ended without its goodbye.")
	for _, r := range results {
		for _, m := range r.stats.Samples {
			fmt.Fprintf(w, "  %s sample: %s\n", r.name, m)
		}
	}
}

func percentiles(ds []time.Duration) string {
	if len(ds) == 0 {
		return "-"
	}
	ds = slices.Clone(ds)
	slices.Sort(ds)
	at := func(q float64) time.Duration { return ds[min(len(ds)-1, int(q*float64(len(ds))))] }
	return fmt.Sprintf("%s/%s/%s", ms(at(0.5)), ms(at(0.99)), ms(ds[len(ds)-1]))
}

func meanMax(ds []time.Duration) string {
	var sum, mx time.Duration
	for _, d := range ds {
		sum += d
		mx = max(mx, d)
	}
	return fmt.Sprintf("%s (max %s)", ms(sum/time.Duration(len(ds))), ms(mx))
}

func ms(d time.Duration) string { return strconv.FormatFloat(float64(d)/1e6, 'f', 1, 64) + "ms" }
