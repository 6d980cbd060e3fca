//go:build !unix

package graceful

import (
	"context"
	"net"
	"time"
)

// platform is empty where descriptors cannot be passed: the process binds
// its own sockets, serves and drains, but cannot upgrade in place.
type platform struct{}

func (p *Process) initPlatform() error { return nil }

func (p *Process) hasParent() bool { return false }

func (p *Process) listen(network, addr string) (net.Listener, error) {
	return bindStream(network, addr)
}

func (p *Process) listenPacket(network, addr string) (net.PacketConn, error) {
	return bindPacket(network, addr)
}

func (p *Process) waitPrevious() error { return ErrNotSupported }

func (p *Process) awaitPrevious(context.Context) {}

func (p *Process) upgrade([]byte, bool) (int, error) { return 0, ErrNotSupported }

func (p *Process) waitParent(context.Context) {}

func (p *Process) notifyReady() error { return nil }

func (p *Process) parentGone(time.Duration) bool { return false }

func (p *Process) stopPlatform() {}

func (p *Process) signalSuccessor() {}

func (p *Process) reclaim() {}

func (p *Process) reclaimKeeping(*keeper) {}
