// sha256 through OpenSSL (SHA extensions where the CPU has them): writing a
// card hashes every byte twice, and GLib's portable sha256 is several times
// slower.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

typedef struct evp_md_ctx_st EVP_MD_CTX;

namespace treeflash {

class Sha256 {
public:
    Sha256();
    ~Sha256();
    Sha256(Sha256&&) noexcept;
    Sha256& operator=(Sha256&&) noexcept;
    void update(const void* data, size_t size);
    void update(std::string_view data) { update(data.data(), data.size()); }
    // The digest in lower-case hex; the object starts over afterwards.
    std::string hex();

private:
    struct Free {
        void operator()(EVP_MD_CTX* context) const;
    };
    std::unique_ptr<EVP_MD_CTX, Free> m_context;
};

std::string sha256_hex(std::string_view data);

} // namespace treeflash
