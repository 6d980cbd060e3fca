package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/graceful-go/graceful/control"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// BenchmarkCanary deploys each bad build of the reference server (30% of
// answers 500, a panic 1 s after serving, 20 ms added to every request),
// under the same load, once with a probation (2 s, 10% of the connections,
// latency judged at 3x) and once without, and watches the clients for 6 s
// from the deploy: the errors they saw, their p99, and, with the
// probation, the time from the first bad answer (a 500, an error, or one
// that took 20 ms or more) to the rollback. A good
// build shows what the probation costs a deploy: the time to promotion.
//
//	go test -run '^$' -bench BenchmarkCanary -benchtime 1x ./internal/bench
func BenchmarkCanary(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := b.TempDir()
	build := func(name, ldflags string) string {
		bin, err := loadtest.BuildWith(ctx, filepath.Join(dir, name), "github.com/graceful-go/graceful/examples/httpserver", false, "-X main.version="+name+" "+ldflags)
		if err != nil {
			b.Fatal(err)
		}
		return bin
	}
	v1 := build("v1", "")
	cases := []struct{ name, bin string }{
		{"failRate=0.3", build("failing", "-X main.failRate=0.3")},
		{"panicAfter=1s", build("panicking", "-X main.panicAfter=1s")},
		{"extraLatency=20ms", build("slow", "-X main.extraLatency=20ms")},
		{"good", build("v2", "")},
	}
	const watch = 6 * time.Second
	probation := []string{"-probation", "2s", "-canary-share", "0.1", "-probation-latency-ratio", "3"}
	for range b.N {
		for _, c := range cases {
			for _, mode := range []string{"probation", "none"} {
				args := []string{}
				if mode == "probation" {
					args = probation
				}
				r := deployUnderLoad(b, ctx, v1, c.bin, args, watch)
				b.Logf("%-18s %-9s deploy %-28s in %6v | clients over %v: %5d requests, %4d 500s, %4d other errors, p99 %v | first bad answer -> rollback %v",
					c.name, mode, r.outcome, r.took.Round(time.Millisecond), watch, r.requests, r.status, r.other, r.p99.Round(100*time.Microsecond), r.toRevert)
			}
		}
	}
}

type deployResult struct {
	outcome       string
	took          time.Duration // of the deploy: until promoted, or rolled back
	requests      int
	status, other int
	p99           time.Duration
	toRevert      string
}

// deployUnderLoad starts base with args, puts load on it, installs next at
// its path and upgrades through the control socket, and watches the
// clients for watch from the deploy.
func deployUnderLoad(b *testing.B, ctx context.Context, base, next string, args []string, watch time.Duration) deployResult {
	sdir := b.TempDir()
	live := filepath.Join(sdir, "httpserver")
	copyFile(b, base, live)
	sock := filepath.Join(sdir, "control.sock")
	logs, err := os.Create(filepath.Join(sdir, "server.log"))
	if err != nil {
		b.Fatal(err)
	}
	defer logs.Close()
	srv, err := loadtest.Start(ctx, loadtest.Config{Bin: live, Dir: sdir, Logs: logs, Args: append([]string{"-control", sock, "-upgrade-timeout", "30s"}, args...)})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Kill()
	load := loadtest.StartLoad(srv.Addr, loadtest.Mix{KeepAliveGET: 8, FreshGET: 2})
	time.Sleep(300 * time.Millisecond)
	copyFile(b, next, live+".new")
	if err := os.Rename(live+".new", live); err != nil {
		b.Fatal(err)
	}
	began := time.Now()
	_, uerr := control.Upgrade(ctx, sock)
	r := deployResult{took: time.Since(began), outcome: "promoted"}
	if uerr != nil {
		r.outcome = "refused"
		if strings.Contains(uerr.Error(), "rolled back") {
			r.outcome = "rolled back"
		}
	}
	time.Sleep(time.Until(began.Add(watch)))
	st := load.Stop()
	var lat []time.Duration
	firstBad := time.Time{}
	ended := began.Add(r.took)
	for _, o := range st.Timeline {
		if o.At.Before(began) || o.At.After(began.Add(watch)) {
			continue
		}
		r.requests++
		if o.Failed && firstBad.IsZero() && o.At.Before(ended) {
			firstBad = o.At
		}
	}
	for _, l := range st.Latencies {
		if l.At.Before(began) || l.At.After(began.Add(watch)) {
			continue
		}
		lat = append(lat, l.D)
		if l.D >= 20*time.Millisecond && l.At.Before(ended) && (firstBad.IsZero() || l.At.Before(firstBad)) { // the slow build adds 20 ms
			firstBad = l.At
		}
	}
	r.status = st.Failures["status"]
	r.other = st.Failed() - r.status
	if len(lat) > 0 {
		slices.Sort(lat)
		r.p99 = lat[len(lat)*99/100]
	}
	r.toRevert = "-"
	if r.outcome == "rolled back" && !firstBad.IsZero() {
		r.toRevert = ended.Sub(firstBad).Round(time.Millisecond).String()
	}
	return r
}

func copyFile(b *testing.B, from, to string) {
	data, err := os.ReadFile(from)
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(to, data, 0o755); err != nil {
		b.Fatal(fmt.Errorf("copy to %s: %w", to, err))
	}
}
