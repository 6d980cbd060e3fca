package graceful

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// notify sends one state message to systemd's NOTIFY_SOCKET; without one it
// does nothing. NOTIFY_SOCKET stays in the environment: the next generation
// needs it.
func (p *Process) notify(lines ...string) {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return
	}
	if _, err := daemon.SdNotify(false, strings.Join(lines, "\n")); err != nil {
		p.log.Warn("systemd notify failed", "err", err)
	}
}

func status(format string, args ...any) string {
	return "STATUS=" + strings.ReplaceAll(fmt.Sprintf(format, args...), "\n", " ")
}

func monotonicUsec() string {
	return strings.TrimSpace(daemon.SdNotifyMonotonicUsec())
}

// extendTimeout asks systemd for d more before it gives up on a stop.
func extendTimeout(d time.Duration) string {
	return "EXTEND_TIMEOUT_USEC=" + strconv.FormatInt(d.Microseconds(), 10)
}

// watchdogInterval returns systemd's watchdog interval for this process, or
// 0. A successor inherits WATCHDOG_PID naming its parent; it becomes the
// main process, so it pings too.
func (p *Process) watchdogInterval() time.Duration {
	usec, err := strconv.ParseInt(os.Getenv("WATCHDOG_USEC"), 10, 64)
	if err != nil || usec <= 0 {
		return 0
	}
	if pid := os.Getenv("WATCHDOG_PID"); pid != "" && pid != strconv.Itoa(os.Getpid()) && !p.hasParent() {
		return 0
	}
	return time.Duration(usec) * time.Microsecond
}

// watchdog pings systemd at once, then at half the interval, until stop is
// closed. At once: generations that replace each other faster than half
// the interval (reloads in a row) would otherwise never ping, and the
// service's watchdog would expire across them.
func (p *Process) watchdog(stop <-chan struct{}) {
	iv := p.watchdogInterval()
	if iv == 0 {
		return
	}
	p.notify("WATCHDOG=1")
	t := time.NewTicker(iv / 2)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			p.notify("WATCHDOG=1")
		}
	}
}
