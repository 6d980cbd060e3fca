package graceful

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// This file holds the probation of a new version (Options.Probation): the
// request figures both processes keep, the verdict, the old process's side
// (it splits the traffic and judges) and the canary's (it serves what it is
// handed until promoted or rolled back).
//
// The exchange, on the hand-off channel (control messages, see events.go):
//
//	old -> new  probation  before the new process starts: it is a canary
//	new -> old  candidate  its checks passed; it serves what it is handed
//	old -> new  report?    the window is over: send your figures
//	new -> old  report     its ProbationStats
//	old -> new  promote    declare yourself ready (tableflip's Ready): the usual hand-over follows
//	old -> new  revert     hand every connection back, drain by the deadline given, exit
//	new -> old  handed-back  every connection it could hand back is on its way
//	new -> old  leaving    it stops on its own (a signal, ...): the old process ends the window
//
// During the window the old process passes every chosen connection over the
// same channel as a hand-over does, before reading anything from it; the
// canary does not accept from the listeners at all until promoted, so the
// split is exact, not the kernel's.

// ProbationStats are the requests one process served during a probation
// window, under [Process.Serve] (HTTP/1 and HTTP/2; ServeConns and servers
// of [Process.Add] are not counted).
//
// The verdict, in order: the canary is rolled back if it exited or did not
// report; if its pre-ready checks fail at the end of the window; if, with at
// least [Options.ProbationMinRequests] requests, its rate of failed
// requests (Errors+Panics) exceeds the old process's by more than
// [Options.ProbationErrorMargin] and the difference is significant (a
// one-sided two-proportion z-test at z >= 3, so that a few unlucky errors
// on a small sample do not roll back a good build); if
// [Options.ProbationLatencyRatio] is set and its p99 exceeds that multiple
// of the old process's (and by more than 1 ms: below that, two processes
// sharing CPUs differ by scheduling alone); and if [Options.ProbationJudge]
// says so. When the
// old process served fewer than ProbationMinRequests, its rate counts as
// zero. When the canary has served fewer at the end of the window, the
// window goes on, a quarter of Probation at a time, until it has or until
// half of the time left before UpgradeTimeout has passed; traffic still too
// thin to judge its rates, it is promoted on having run and passed its
// checks (and the log says so): a quiet hour must not make every deploy
// fail.
type ProbationStats struct {
	Requests int           `json:"requests"` // answered, or ended by a panic
	Errors   int           `json:"errors"`   // answered with a 5xx status
	Panics   int           `json:"panics"`   // handler panics (not http.ErrAbortHandler)
	P99      time.Duration `json:"p99_ns"`   // of handler time; 25% resolution
	Checks   string        `json:"checks,omitempty"`
}

// FailureRate is (Errors+Panics)/Requests, 0 without requests.
func (s ProbationStats) FailureRate() float64 {
	if s.Requests == 0 {
		return 0
	}
	return float64(s.Errors+s.Panics) / float64(s.Requests)
}

// latencyFloor is the least p99 difference the latency criterion judges:
// below it, two processes sharing a CPU differ by scheduling alone.
const latencyFloor = time.Millisecond

// Histogram of handler latencies: bucket i counts those up to
// latencyBase*latencyStep^i.
const (
	latencyBuckets = 96
	latencyBase    = 10 * time.Microsecond
	latencyStep    = 1.25
)

// requestStats counts the requests a process serves, from the start.
type requestStats struct {
	requests, errors, panics atomic.Int64
	latency                  [latencyBuckets]atomic.Int64
}

// snapshot copies the counts.
func (s *requestStats) snapshot() statsSnapshot {
	var c statsSnapshot
	c.requests, c.errors, c.panics = s.requests.Load(), s.errors.Load(), s.panics.Load()
	for i := range s.latency {
		c.latency[i] = s.latency[i].Load()
	}
	return c
}

type statsSnapshot struct {
	requests, errors, panics int64
	latency                  [latencyBuckets]int64
}

// since returns what was counted between base and s.
func (s statsSnapshot) since(base statsSnapshot) ProbationStats {
	out := ProbationStats{Requests: int(s.requests - base.requests), Errors: int(s.errors - base.errors), Panics: int(s.panics - base.panics)}
	var n int64
	var hist [latencyBuckets]int64
	for i := range hist {
		hist[i] = s.latency[i] - base.latency[i]
		n += hist[i]
	}
	if n > 0 {
		rank := int64(math.Ceil(0.99 * float64(n)))
		var seen int64
		for i, c := range hist {
			if seen += c; seen >= rank {
				out.P99 = bucketBound(i)
				break
			}
		}
	}
	return out
}

func bucketBound(i int) time.Duration {
	return time.Duration(float64(latencyBase) * math.Pow(latencyStep, float64(i)))
}

func (s *requestStats) observe(d time.Duration, status int, panicked bool) {
	s.requests.Add(1)
	switch {
	case panicked:
		s.panics.Add(1)
	case status >= 500:
		s.errors.Add(1)
	}
	i := 0
	if d > latencyBase {
		i = min(int(math.Ceil(math.Log(float64(d)/float64(latencyBase))/math.Log(latencyStep))), latencyBuckets-1)
	}
	s.latency[i].Add(1)
}

// handler counts what next serves.
func (s *requestStats) handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: w}
		start := time.Now()
		done := false
		defer func() {
			if done {
				return
			}
			v := recover()
			if v == nil {
				return // runtime.Goexit: let it go on
			}
			if v != http.ErrAbortHandler {
				s.observe(time.Since(start), 0, true)
			}
			panic(v) // net/http's own recovery takes it from here
		}()
		next.ServeHTTP(sw, r)
		done = true
		if !sw.hijacked {
			s.observe(time.Since(start), cmpStatus(sw.status), false)
		}
	})
}

func cmpStatus(s int) int {
	if s == 0 {
		return http.StatusOK
	}
	return s
}

// statusWriter notes the status of a response; Flush, Hijack, ReadFrom and
// Unwrap (for http.ResponseController) reach the writer under it.
type statusWriter struct {
	http.ResponseWriter
	status   int
	hijacked bool
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) ReadFrom(r io.Reader) (int64, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return io.Copy(w.ResponseWriter, r)
}

func (w *statusWriter) Flush() {
	http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *statusWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, rw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err == nil {
		w.hijacked = true
	}
	return c, rw, err
}

// Push keeps HTTP/2 server push.
func (w *statusWriter) Push(target string, opts *http.PushOptions) error {
	if pusher, ok := w.ResponseWriter.(http.Pusher); ok {
		return pusher.Push(target, opts)
	}
	return http.ErrNotSupported
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// checkProbation refuses settings that cannot work, naming the field.
func (o *Options) checkProbation() error {
	switch {
	case o.Probation < 0:
		return fmt.Errorf("graceful: Probation %v is negative", o.Probation)
	case o.CanaryShare < 0 || o.CanaryShare > 1 || math.IsNaN(o.CanaryShare):
		return fmt.Errorf("graceful: CanaryShare %v is not a fraction from 0 to 1", o.CanaryShare)
	case o.ProbationMinRequests < 0:
		return fmt.Errorf("graceful: ProbationMinRequests %d is negative", o.ProbationMinRequests)
	case o.ProbationLatencyRatio < 0 || math.IsNaN(o.ProbationLatencyRatio) || (o.ProbationLatencyRatio > 0 && o.ProbationLatencyRatio < 1):
		return fmt.Errorf("graceful: ProbationLatencyRatio %v: want 1 or more (or 0: off)", o.ProbationLatencyRatio)
	case math.IsNaN(o.ProbationErrorMargin) || o.ProbationErrorMargin > 1:
		return fmt.Errorf("graceful: ProbationErrorMargin %v is not a fraction", o.ProbationErrorMargin)
	case o.Probation > 0 && o.Probation >= o.UpgradeTimeout:
		return fmt.Errorf("graceful: Probation (%v) must be shorter than UpgradeTimeout (%v), which bounds the whole upgrade", o.Probation, o.UpgradeTimeout)
	}
	if o.CanaryShare == 0 {
		o.CanaryShare = DefaultCanaryShare
	}
	if o.ProbationMinRequests == 0 {
		o.ProbationMinRequests = DefaultProbationMinRequests
	}
	switch {
	case o.ProbationErrorMargin == 0:
		o.ProbationErrorMargin = DefaultProbationErrorMargin
	case o.ProbationErrorMargin < 0:
		o.ProbationErrorMargin = 0
	}
	return nil
}

// verdict returns why the canary must be rolled back, or "" to promote it;
// thin reports that its rates were not judged.
func (o *Options) verdict(canary, stable ProbationStats) (reason string, thin bool) {
	if canary.Checks != "" {
		return "its checks fail: " + canary.Checks, false
	}
	if canary.Requests < o.ProbationMinRequests {
		thin = true
	} else {
		base := ProbationStats{}
		if stable.Requests >= o.ProbationMinRequests {
			base = stable
		}
		cr, br := canary.FailureRate(), base.FailureRate()
		if cr > br+o.ProbationErrorMargin && significant(canary, base) {
			what := "5xx"
			if canary.Panics+stable.Panics > 0 {
				what = "5xx and panics"
			}
			return fmt.Sprintf("%s %s of %s requests vs %s of %s", what, percent(cr), thousands(canary.Requests), percent(br), thousands(stable.Requests)), false
		}
		if r := o.ProbationLatencyRatio; r > 0 && stable.Requests >= o.ProbationMinRequests &&
			float64(canary.P99) > r*float64(stable.P99) && canary.P99-stable.P99 > latencyFloor {
			return fmt.Sprintf("p99 %v of %s requests vs %v of %s (more than %gx)", canary.P99.Round(10*time.Microsecond), thousands(canary.Requests), stable.P99.Round(10*time.Microsecond), thousands(stable.Requests), r), false
		}
	}
	if o.ProbationJudge != nil {
		if err := o.ProbationJudge(canary, stable); err != nil {
			return "ProbationJudge: " + err.Error(), thin
		}
	}
	return "", thin
}

// significant reports whether the canary's failure rate is above base's by
// at least three standard errors (a one-sided two-proportion z-test; against
// a base without requests, a one-sample test against rate 0 always passes
// once any request failed).
func significant(canary, base ProbationStats) bool {
	cf := float64(canary.Errors + canary.Panics)
	bf := float64(base.Errors + base.Panics)
	cn, bn := float64(canary.Requests), float64(base.Requests)
	if bn == 0 {
		return cf > 0
	}
	pooled := (cf + bf) / (cn + bn)
	se := math.Sqrt(pooled * (1 - pooled) * (1/cn + 1/bn))
	if se == 0 {
		return cf/cn > bf/bn
	}
	return (cf/cn-bf/bn)/se >= 3
}

func percent(f float64) string { return strconv.FormatFloat(100*f, 'f', 1, 64) + "%" }

// thousands formats n with comma separators: 7,420.
func thousands(n int) string {
	s := strconv.Itoa(n)
	for i := len(s) - 3; i > 0 && s[i-1] != '-'; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// rollbackError is the error of an upgrade whose canary was rolled back.
type rollbackError struct{ msg string }

func (e *rollbackError) Error() string { return e.msg }
func (e *rollbackError) Unwrap() error { return ErrRolledBack }

// Control messages of the probation (see the exchange above).
const (
	probationMessage  = "\x00probation"
	candidateMessage  = "\x00candidate"
	reportRequest     = "\x00report?"
	reportMessage     = "\x00report"
	promoteMessage    = "\x00promote"
	revertMessage     = "\x00revert"
	handedBackMessage = "\x00handed-back"
	leavingMessage    = "\x00leaving" // to the parent: the canary stops on its own (signal, ...): why
)

// revertTerms is the body of a revert message.
type revertTerms struct {
	Reason   string    `json:"reason"`
	Deadline time.Time `json:"deadline"`        // the canary's drain ends by then
	Alone    bool      `json:"alone,omitempty"` // drain without handing back: the old process drains too
}

// reportTimeout bounds the wait for the canary's figures.
const reportTimeout = 2 * time.Second

// diverter chooses the connections that go to the canary, exactly one in
// 1/share, counting new connections and existing keep-alive ones alike.
type diverter struct {
	share  float64
	n      atomic.Uint64
	sent   atomic.Int64
	failed atomic.Bool    // a send failed: the canary does not take them; keep the rest here
	wg     sync.WaitGroup // diverts in flight
	log    *slog.Logger
	send   func(key string, c net.Conn) error
	keep   func(key string, c net.Conn) // serves here a connection that could not be sent
}

func (d *diverter) pick() bool {
	if d.failed.Load() {
		return false
	}
	n := d.n.Add(1)
	return math.Floor(float64(n)*d.share) > math.Floor(float64(n-1)*d.share)
}

// divert passes a just-accepted connection, from which nothing was read, to
// the canary; if that fails it is served here.
func (d *diverter) divert(key string, c net.Conn) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		if err := d.send(key, c); err != nil {
			if d.failed.CompareAndSwap(false, true) && d.log != nil {
				d.log.Warn("probation: the new process did not take a connection; the split stops", "err", err)
			}
			d.keep(key, c)
			return
		}
		d.sent.Add(1)
		c.Close()
	}()
}

// trial is the old process's side of one probation.
type trial struct {
	p         *Process
	start     time.Time // the attempt's
	candidate chan int  // the canary's PID: its checks passed
	report    chan ProbationStats
	back      chan struct{} // the canary has handed everything back
	ended     chan struct{} // tableflip's Upgrade returned
	done      chan struct{} // run returned
	abort     chan abortRequest

	// Set by run before done closes.
	pid    int
	began  time.Time // the window's start; zero if the canary never got there
	judged time.Time // the verdict
	killed bool      // it was killed: it hands nothing back
	alone  bool      // rolled back to drain on its own: it hands nothing back

	serving atomic.Bool // the window began: the canary serves clients
	verdict string      // the rollback's reason; "" when promoted or not judged
	div     *diverter
	keep    *keeper // duplicates of what the canary holds; nil if none could be made
}

// beginTrial starts the probation of the attempt that starts at start, or
// returns nil without Options.Probation.
func (p *Process) beginTrial(start time.Time) *trial {
	if p.opts.Probation <= 0 || p.toSuccessor == nil || p.opts.NoHandOff {
		return nil
	}
	tr := &trial{p: p, start: start, candidate: make(chan int, 1), report: make(chan ProbationStats, 1), back: make(chan struct{}, 1), ended: make(chan struct{}), done: make(chan struct{}), abort: make(chan abortRequest, 1)}
	if k, err := newKeeper(); err != nil {
		p.log.Warn("probation: no board; if the new process dies, what it holds dies with it", "err", err)
	} else {
		tr.keep = k
	}
	p.trial.Store(tr)
	go tr.run()
	return tr
}

// deadline is when tableflip gives up on the new process.
func (tr *trial) deadline() time.Time { return tr.start.Add(tr.p.opts.UpgradeTimeout) }

func (tr *trial) run() {
	defer close(tr.done)
	p := tr.p
	var early *abortRequest // abandoned during the new process's checks
wait:
	for {
		select {
		case tr.pid = <-tr.candidate:
			break wait
		case <-tr.ended:
			return // failed before its checks passed, or an older version that knows no probation
		case a := <-tr.abort:
			early = &a // rolled back as soon as its checks pass
		}
	}
	p.attemptPID(tr.pid)
	tr.began = time.Now()
	tr.serving.Store(true)
	// The window may be extended while traffic is too thin to judge, until
	// latest: half of the time the checks left.
	latest := tr.deadline().Add(-time.Until(tr.deadline()) / 2)
	end := earlier(tr.began.Add(p.opts.Probation), latest)
	base := p.stats.snapshot()
	tr.div = &diverter{share: p.opts.CanaryShare, send: tr.send, keep: p.inboxes.deliver, log: p.log}
	var canary ProbationStats
	var err error
	if early != nil {
		err = *early // no window: rolled back at once
	} else {
		p.log.Info("probation: the new process serves its share", "new_pid", tr.pid, "share", p.opts.CanaryShare, "until", end.Format(time.RFC3339))
		p.notify(status("upgrading: pid %d on probation with %s of the connections", tr.pid, percent(p.opts.CanaryShare)))
		// A canary that stalls must not hold a client: a connection it
		// does not take within a second is served here.
		p.toSuccessor.setPatience(time.Second)
		p.startDivert(tr.div)
		defer p.stopDivert()
		if tr.keep != nil {
			// Duplicates of what the canary is done with are closed as it goes.
			stop, pruned := make(chan struct{}), make(chan struct{})
			go func() {
				defer close(pruned)
				tr.keep.pruneEvery(250*time.Millisecond, stop)
			}()
			defer func() {
				close(stop)
				<-pruned
			}()
		}
	}
	for extended := false; err == nil; extended = true {
		if err = tr.sleep(time.Until(end)); err != nil {
			break
		}
		if tr.div.failed.Load() {
			// It stalled: the split stopped, it would only be judged on
			// thin traffic.
			err = errStalled
			break
		}
		if canary, err = tr.ask(); err != nil || canary.Requests >= p.opts.ProbationMinRequests || !time.Now().Before(latest) {
			break
		}
		if !extended {
			p.log.Info("probation: too few requests to judge yet; extending the window", "new_pid", tr.pid, "canary_requests", canary.Requests, "min_requests", p.opts.ProbationMinRequests, "until", latest.Format(time.RFC3339))
		}
		end = earlier(time.Now().Add(max(p.opts.Probation/4, 250*time.Millisecond)), latest)
	}
	if err == errEnded {
		return // it died: end names it
	}
	var aborted abortRequest
	if err != nil && err != errStalled && !errors.As(err, &aborted) {
		// It did not report: stalled or broken. What it holds is lost
		// either way; what it never read is served here at once, not at
		// UpgradeTimeout.
		tr.kill()
	}
	p.stopDivert()
	tr.div.wg.Wait()
	p.awaitClaims(reportTimeout) // what was chosen reaches the canary before the verdict
	stable := p.stats.snapshot().since(base)
	reason, thin, alone := "", false, false
	switch {
	case errors.As(err, &aborted):
		reason, alone = aborted.reason, aborted.alone
	case err == errStalled:
		reason = err.Error()
	case err != nil:
		reason = "it did not report its figures: " + err.Error()
	default:
		reason, thin = p.opts.verdict(canary, stable)
	}
	attrs := []any{"new_pid", tr.pid, "canary_requests", canary.Requests, "canary_failed", canary.Errors + canary.Panics, "canary_p99", canary.P99, "old_requests", stable.Requests, "old_failed", stable.Errors + stable.Panics, "old_p99", stable.P99}
	if reason == "" {
		if thin {
			p.log.Warn("probation: too few requests to judge the new process's rates; promoting it", append(attrs, "min_requests", p.opts.ProbationMinRequests)...)
		} else {
			p.log.Info("probation passed: promoting the new process", attrs...)
		}
		if err := p.toSuccessor.sendControl(promoteMessage, reportTimeout); err != nil {
			p.log.Error("probation: cannot promote the new process", "err", err)
		}
		return
	}
	tr.verdict, tr.judged, tr.alone = reason, time.Now(), alone
	if errors.As(err, &aborted) {
		p.log.Warn("probation ended early: rolling the new process back", "new_pid", tr.pid, "reason", reason)
	} else {
		p.log.Warn("probation failed: rolling the new process back", append(attrs, "reason", reason)...)
	}
	if tr.killed {
		return
	}
	deadline := tr.deadline().Add(-time.Second)
	if ctx := p.drainContext(); ctx != nil {
		if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d // we drain too: it must be done before we are
		}
	}
	b, _ := json.Marshal(revertTerms{Reason: reason, Deadline: deadline, Alone: alone})
	if err := p.toSuccessor.sendControl(revertMessage+" "+string(b), reportTimeout); err != nil {
		p.log.Error("probation: cannot tell the new process to roll back; it is stopped", "err", err)
		tr.kill()
	}
}

// send passes c to the canary, keeping a duplicate of its descriptor when
// there is a board.
func (tr *trial) send(key string, c net.Conn) error {
	if tr.keep == nil {
		return tr.p.toSuccessor.send(key, c)
	}
	return tr.keep.send(tr.p.toSuccessor, key, c)
}

// rescue serves, once the canary is dead, the connections it held idle or
// never read (see probation_board.go); it closes every duplicate. A canary
// still alive (tableflip returns as soon as it has sent SIGKILL) is waited
// for, briefly: while it lives nothing is rescued.
func (tr *trial) rescue() {
	p := tr.p
	defer tr.keep.closeAll()
	if tr.pid == 0 || tr.keep.empty() || !processGone(tr.pid, 2*time.Second) {
		return
	}
	if served, lost := tr.keep.rescue(p.inboxes.deliver); served+lost > 0 {
		p.log.Warn("probation: the new process died; the connections it held idle or had not read are served here, those in mid-request are lost", "served", served, "lost", lost)
	}
}

// kill stops a canary that cannot be told to roll back.
func (tr *trial) kill() {
	tr.killed = true
	if proc, err := os.FindProcess(tr.pid); err == nil && tr.pid > 0 {
		proc.Kill()
	}
}

func earlier(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// errEnded: the new process's attempt ended (it died) while waiting.
var errEnded = errors.New("the attempt ended")

// errStalled is the verdict on a canary that did not take a connection
// within a second.
var errStalled = errors.New("it did not take the connections handed to it (one waited over 1s)")

// abortRequest ends a probation early (an error, for run's waits): the new
// process is leaving (it was told to stop), or this one is. alone: the
// canary drains without handing anything back (we drain too).
type abortRequest struct {
	reason string
	alone  bool
}

func (a abortRequest) Error() string { return a.reason }

// abandon ends the probation now, rolling the canary back for reason.
func (tr *trial) abandon(reason string, alone bool) {
	select {
	case tr.abort <- abortRequest{reason, alone}:
	default: // one is enough
	}
}

// sleep waits d; it returns errEnded if the attempt ends meanwhile, the
// abortRequest if the probation is abandoned.
func (tr *trial) sleep(d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-tr.ended:
		return errEnded
	case a := <-tr.abort:
		return a
	}
}

// ask asks the canary for its figures.
func (tr *trial) ask() (ProbationStats, error) {
	select {
	case <-tr.report: // a late answer to an earlier question
	default:
	}
	if err := tr.p.toSuccessor.sendControl(reportRequest, reportTimeout); err != nil {
		return ProbationStats{}, err
	}
	t := time.NewTimer(reportTimeout)
	defer t.Stop()
	select {
	case st := <-tr.report:
		return st, nil
	case <-t.C:
		return ProbationStats{}, errors.New("no report within " + reportTimeout.String())
	case <-tr.ended:
		return ProbationStats{}, errEnded
	case a := <-tr.abort:
		return ProbationStats{}, a
	}
}

// end finishes the trial once tableflip's Upgrade has returned err, and
// returns the attempt's error: err, or the rollback's.
func (tr *trial) end(err error) error {
	close(tr.ended)
	<-tr.done
	p := tr.p
	p.trial.CompareAndSwap(tr, nil)
	p.toSuccessor.setPatience(0) // a hand-over waits for the successor until the drain's deadline
	if tr.div != nil {
		tr.div.wg.Wait()
	}
	if err == nil {
		tr.keep.closeAll() // promoted: what it holds is its own
		return nil         // the drain passes every idle connection on from now
	}
	p.endDivert()
	if tr.keep != nil {
		tr.keep.stop() // every send that kept a duplicate has ended
	}
	if tr.verdict != "" && !tr.killed && !tr.alone {
		// Its connections come back before its last message.
		t := time.NewTimer(reportTimeout)
		select {
		case <-tr.back:
		case <-t.C:
			p.log.Warn("probation: the rolled-back process did not say it handed everything back")
		}
		t.Stop()
	}
	p.reclaimKeeping(tr.keep)
	if tr.keep != nil {
		tr.rescue()
	}
	switch {
	case tr.verdict != "":
		return &rollbackError{fmt.Sprintf("rolled back after %v: %s", tr.judged.Sub(tr.began).Round(100*time.Millisecond), tr.verdict)}
	case !tr.began.IsZero():
		return &rollbackError{fmt.Sprintf("rolled back: the new process died %v into its probation: %v", time.Since(tr.began).Round(100*time.Millisecond), err)}
	}
	return err
}

// startDivert makes every served HTTP listener pass its share of new
// connections to the canary, and claim its share of the open keep-alive
// ones, each chosen or not as it next goes idle (a stream that never does
// takes no share).
func (p *Process) startDivert(d *diverter) {
	for _, t := range p.trackerList() {
		if t.raw {
			continue
		}
		key := t.key
		t.mu.Lock()
		t.selective.Store(true)
		t.setSend(func(c net.Conn) error { return d.send(key, c) })
		t.divert.Store(d)
		for c := range t.conns {
			if c.http == http.StateIdle {
				t.chooseLocked(c) // the others as they next go idle
			}
		}
		t.mu.Unlock()
	}
}

// stopDivert ends the split: new connections stay here, and no more open
// ones are claimed (those claimed already are sent).
func (p *Process) stopDivert() {
	for _, t := range p.trackerList() {
		t.mu.Lock()
		t.divert.Store(nil)
		for c := range t.conns {
			c.toCanary, c.chosen = false, false
		}
		t.mu.Unlock()
	}
}

// endDivert ends a probation that did not promote: no connection is
// claimed for a new process any more.
func (p *Process) endDivert() {
	for _, t := range p.trackerList() {
		t.mu.Lock()
		if t.selective.Load() {
			t.setSend(nil)
			t.selective.Store(false)
		}
		t.mu.Unlock()
	}
}

// awaitClaims waits, at most d, until no connection claimed for the canary
// is still on its way.
func (p *Process) awaitClaims(d time.Duration) {
	deadline := time.Now().Add(d)
	for _, t := range p.trackerList() {
		for {
			t.mu.Lock()
			pending := false
			for c := range t.conns {
				if s := c.state(); s == connClaimed || s == connHanding {
					pending = true
					break
				}
			}
			changed := t.changedLocked()
			t.mu.Unlock()
			left := time.Until(deadline)
			if !pending || left <= 0 {
				break
			}
			timer := time.NewTimer(min(left, 10*time.Millisecond))
			select {
			case <-changed:
			case <-timer.C:
			}
			timer.Stop()
		}
	}
}

// trackerList returns the served listeners' trackers.
func (p *Process) trackerList() []*tracker {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.trackers)
}

// takesBack reports whether connections can come back from a new process:
// this process judges its successors.
func (p *Process) takesBack() bool {
	return p.opts.Probation > 0 && p.toSuccessor != nil && !p.opts.NoHandOff
}

// canary is the new process's side of a probation: set at New when the
// old process said so.
type canary struct {
	promote chan struct{}
	revert  chan revertTerms
	once    sync.Once
	open    chan struct{} // closed at promotion: the listeners accept
}

func newCanary() *canary {
	return &canary{promote: make(chan struct{}, 1), revert: make(chan revertTerms, 1), open: make(chan struct{})}
}

// serveProbation runs a canary's probation: it serves what the old process
// hands it until promoted (true) or rolled back, told to stop or left
// without a server (false, and why). alone: drain without handing back (the
// old process drains too).
func (p *Process) serveProbation(ctx context.Context, drainSig <-chan os.Signal) (promoted bool, why string, alone bool) {
	c := p.canary
	p.life.enter(PhaseProbation)
	p.probationBegan()
	p.log.Info("on probation: serving the connections the previous process hands over")
	if err := p.fromParent.sendControl(candidateMessage+" "+strconv.Itoa(os.Getpid()), reportTimeout); err != nil {
		if p.parentGone(time.Second) {
			p.log.Warn("probation: the previous process is gone before the window; serving alone, unjudged", "err", err)
			return true, "", false
		}
		return false, "cannot tell the previous process the checks passed: " + err.Error(), false
	}
	select {
	case <-c.promote:
		return true, "", false
	case t := <-c.revert:
		p.mu.Lock()
		p.drainBy = t.Deadline
		p.mu.Unlock()
		return false, "by the previous process: " + t.Reason, t.Alone
	case sig := <-drainSig:
		why = "on signal " + sig.String()
	case <-ctx.Done():
		why = "as its context ended"
	case <-p.group.exited:
		why = "as a server stopped"
	case <-p.fromParent.ended():
		// The old process, our judge, is gone (killed, crashed): this one
		// holds the listeners and is all there is, so it serves, unjudged,
		// rather than leave nothing listening.
		p.log.Warn("probation: the previous process is gone; serving alone, unjudged")
		return true, "", false
	}
	// Leaving on our own: the old process ends the window, and its revert
	// says it sends us nothing more.
	if err := p.fromParent.sendControl(leavingMessage+" ("+why+")", reportTimeout); err != nil {
		p.log.Warn("probation: cannot tell the previous process we stop", "err", err)
		p.parentDelivered()
	}
	return false, why, false
}

// canaryControl acts on the old process's probation messages.
func (p *Process) canaryControl(kind, body string) {
	c := p.canary
	if c == nil {
		return
	}
	switch kind {
	case reportRequest:
		st := p.stats.snapshot().since(statsSnapshot{})
		if ph := p.life.get(); ph != PhaseProbation {
			st.Checks = "no longer on probation: " + ph.String()
		} else if err := joinFailures(p.health.runChecks(context.Background(), false)); err != nil {
			st.Checks = err.Error()
		}
		b, _ := json.Marshal(st)
		if err := p.fromParent.sendControl(reportMessage+" "+string(b), reportTimeout); err != nil {
			p.log.Warn("probation: cannot report to the previous process", "err", err)
		}
	case promoteMessage:
		select {
		case c.promote <- struct{}{}:
		default:
		}
	case revertMessage:
		var t revertTerms
		if err := json.Unmarshal([]byte(body), &t); err != nil {
			t.Reason = "(unreadable reason)"
		}
		// The old process sent everything it had chosen for us before this.
		p.parentDelivered()
		select {
		case c.revert <- t:
		default:
		}
	}
}

// trialControl acts on the canary's probation messages.
func (p *Process) trialControl(kind, body string) {
	tr := p.trial.Load()
	if tr == nil {
		return
	}
	switch kind {
	case candidateMessage:
		pid, _ := strconv.Atoi(body)
		select {
		case tr.candidate <- pid:
		default:
		}
	case reportMessage:
		var st ProbationStats
		if err := json.Unmarshal([]byte(body), &st); err != nil {
			p.log.Warn("probation: the new process's report is unreadable", "err", err)
			return
		}
		select {
		case tr.report <- st:
		default:
		}
	case handedBackMessage:
		select {
		case tr.back <- struct{}{}:
		default:
		}
	case leavingMessage:
		tr.abandon("the new process is stopping "+body, false)
	}
}

// gatedListener is a canary's listener: Accept waits for the promotion, so
// that during probation the canary serves only what it is handed.
type gatedListener struct {
	net.Listener
	open      <-chan struct{}
	closed    chan struct{}
	closeOnce sync.Once
}

func (l *gatedListener) Accept() (net.Conn, error) {
	select {
	case <-l.open:
		return l.Listener.Accept()
	case <-l.closed:
		return nil, &net.OpError{Op: "accept", Net: l.Addr().Network(), Addr: l.Addr(), Err: net.ErrClosed}
	}
}

func (l *gatedListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// gate returns ln, gated until the promotion in a canary.
func (p *Process) gate(ln net.Listener) net.Listener {
	if p.canary == nil {
		return ln
	}
	return &gatedListener{Listener: ln, open: p.canary.open, closed: make(chan struct{})}
}
